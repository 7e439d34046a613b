"""The cost model: its formulas, its measured rates, and `memfit estimate --max-memory`."""

import json

import pytest

from memfit.cli.main import main
from memfit.offload import Placement
from memfit.speed import Rates, measure, predict, read_rate


def rates(**changes) -> Rates:
    base = dict(compute_s=0.02, read_threads=2, read_bytes_per_s=10e9, read_one_bytes_per_s=6e9, cores=2,
                batch=4, context=64)
    return Rates(**{**base, **changes})


def placement(streamed: int, read_ahead: bool) -> Placement:
    return Placement([0], [1] if streamed else [], 100, streamed, 10, 10, 1000, ["f"], read_ahead=read_ahead)


def test_the_step_adds_or_overlaps_reads_as_the_cores_allow():
    streamed = 300_000_000
    r = rates()
    assert r.step_s(streamed, read_ahead=False) == pytest.approx(0.02 + 0.03)  # the step's two threads read
    assert r.step_s(streamed, read_ahead=True) == pytest.approx(0.02 + 0.05)  # the reader takes a working core
    assert rates(cores=3).step_s(streamed, read_ahead=True) == pytest.approx(0.05)  # a spare core: overlapped
    assert rates(cores=3).step_s(60_000_000, read_ahead=True) == pytest.approx(0.02)  # hidden under compute
    gpu = Rates.assumed(2_000_000_000, 1e12, 25e9, batch=8)
    assert gpu.step_s(streamed, read_ahead=True) == pytest.approx(max(0.002, 0.012))
    prediction = predict(placement(streamed, True), r)
    assert prediction.tokens_per_s == pytest.approx(4 / 0.07)
    assert prediction.tokens_per_s_read_when_reached == pytest.approx(4 / 0.05)
    assert predict(placement(0, True), r).tokens_per_s == pytest.approx(4 / 0.02)  # nothing streamed


def test_read_rate_reads_every_byte_once(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 40_000)  # 10 MB
    for threads in (1, 2):
        assert read_rate([(path, 1000, 9_000_000)], threads, rounds=1) > 1e6


def test_measured_rates_of_a_saved_model_and_the_estimate_cli(tmp_path, make_tiny, capsys):
    from memfit.io import save

    model, tokenizer = make_tiny("tiny-llama")
    save(model, tokenizer, tmp_path / "m")
    measured = measure(tmp_path / "m", batch=2, prompt_tokens=8, new_tokens=8, steps=4)
    assert measured.compute_s > 0 and measured.read_bytes_per_s > 0 and measured.read_one_bytes_per_s > 0
    assert (measured.batch, measured.context, measured.source) == (2, 16, "measured")
    assert main(["estimate", "--model", str(tmp_path / "m"), "--mode", "generate", "--seq", "8", "--new-tokens", "8",
                 "--max-memory", "75%", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    placement = out["placement"]
    assert placement["streamed_layers"] and placement["predicted_peak_bytes"] <= out["weight_bytes"] * 0.75
    assert out["prediction"]["streamed_bytes"] == out["placement"]["streamed_bytes"] > 0
    assert out["prediction"]["tokens_per_s"] > 0
    assert main(["estimate", "--model", str(tmp_path / "m"), "--mode", "generate", "--recipe", "int8",
                 "--max-memory", "70%"]) == 2
    assert "save the model with the recipe first" in capsys.readouterr().err


def test_estimate_with_assumed_bandwidths_for_a_config(capsys):
    args = ["estimate", "--model", "llama-3-8b", "--recipe", "int4-g128", "--mode", "generate", "--seq", "128",
            "--new-tokens", "128", "--max-memory", "3GB", "--memory-bandwidth", "1TB", "--read-bandwidth", "25GB",
            "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    placement, prediction = out["placement"], out["prediction"]
    assert placement["predicted_peak_bytes"] <= 3e9 < out["weight_bytes"]
    step = max(out["weight_bytes"] / 1e12, placement["streamed_bytes"] / 25e9)
    assert prediction["tokens_per_s"] == pytest.approx(1 / step)
    assert main([*args[:-1], "--host-memory", "1GB"]) == 2
    assert "over --host-memory" in capsys.readouterr().err
    assert main(["estimate", "--model", "llama-3-8b", "--mode", "generate", "--max-memory", "3GB",
                 "--memory-bandwidth", "1TB"]) == 2
    assert "go together" in capsys.readouterr().err
