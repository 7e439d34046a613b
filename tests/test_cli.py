"""The CLI in-process (exit codes, JSON last line, one-line errors) plus one real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli.main import main

TOKENS = ["--tokens", "1024"]


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _one_line_error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0]
    assert "Traceback" not in err[0]


def test_eval_json_contract(capsys):
    assert main(["eval", "--model", "tiny-llama", *TOKENS, "--json"]) == 0
    data = _last_json(capsys)
    assert set(data) == {
        "perplexity", "eval_tokens", "weight_bytes", "peak_rss_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
        "kv_cache",
    }
    assert data["eval_tokens"] == 1024 and data["weight_bytes"] == 361_792


def test_compress_then_eval_gives_the_same_numbers(capsys, tmp_path):
    out = tmp_path / "int8"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int8", "--out", str(out), *TOKENS, "--json"]) == 0
    compressed = _last_json(capsys)
    assert compressed["recipe"] == "int8" and compressed["out"] == str(out)
    assert compressed["predicted_calibration_bytes"] is None and compressed["calibration_peak_bytes"] is None
    assert main(["eval", "--model", str(out), *TOKENS, "--json"]) == 0
    reloaded = _last_json(capsys)
    assert reloaded["weight_bytes"] == compressed["metrics"]["weight_bytes"] == 94_016
    assert reloaded["perplexity"] == pytest.approx(compressed["metrics"]["perplexity"], rel=1e-6)


def test_optimize_json_contract_and_report(capsys, tmp_path):
    out, report = tmp_path / "best", tmp_path / "reports" / "r.html"
    args = ["optimize", "--model", "tiny-llama", "--budget", "30%", "--calibration-windows", "4", "--out", str(out),
            "--report", str(report)]
    assert main([*args, *TOKENS, "--json"]) == 0
    data = _last_json(capsys)
    assert set(data) == {"budget_bytes", "plan", "distill_steps", "out", "metrics", "candidates", "study"}
    assert data["metrics"]["weight_bytes"] <= data["budget_bytes"] and data["study"] is None  # no workers
    assert {"plan", "distill_steps", "predicted_weight_bytes", "predicted_peak_bytes", "predicted_divergence", "fits",
            "metrics", "skipped"} == set(data["candidates"][0])
    assert data["distill_steps"] is None and all(c["distill_steps"] is None for c in data["candidates"])
    evaluated = [c for c in data["candidates"] if c["metrics"] is not None]
    assert len(evaluated) == 3 and all(c["predicted_divergence"] is not None for c in evaluated)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert report.is_file() and report.with_suffix(".md").is_file()


def test_human_output_is_a_table(capsys):
    assert main(["eval", "--model", "tiny-llama", *TOKENS]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_missing_model_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    code = main(["compress", "--model", str(tmp_path / "nope"), "--recipe", "int8", "--out", str(out)])
    assert code == 2
    _one_line_error(capsys, "not found", "pass a Hugging Face directory")
    assert not out.exists()


def test_unknown_recipe_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int3", "--out", str(out)]) == 2
    _one_line_error(capsys, "unknown recipe token 'int3'", "known tokens")
    assert not out.exists()


def test_impossible_budget_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["optimize", "--model", "tiny-llama", "--budget", "1KB", "--out", str(out), *TOKENS]) == 2
    _one_line_error(capsys, "below the smallest reachable plan", "raise the budget to at least")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_budget_is_one_line_exit_2(capsys, tmp_path):
    assert main(["optimize", "--model", "tiny-llama", "--budget", "lots", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "cannot read size 'lots'")


def test_missing_text_file_is_one_line_exit_2(capsys, tmp_path):
    assert main(["eval", "--model", "tiny-llama", "--text", str(tmp_path / "none.txt")]) == 2
    _one_line_error(capsys, "does not exist")


def test_validate_prints_the_full_recipe(capsys):
    assert main(["validate", "bf16,int4-g64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["strategy"] for s in data["strategies"]] == ["int4", "cast"]


def test_entry_point_runs_as_a_program(tmp_path):
    memfit_bin = Path(sys.executable).with_name("memfit")
    assert memfit_bin.is_file(), "the memfit console script is not installed in this environment"
    done = subprocess.run([str(memfit_bin), "validate", "int3"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "unknown recipe token 'int3'" in done.stderr


def test_optimize_help_has_its_options_and_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--max-ppl-increase" in text and "examples:" in text


def _memfit_json(*args: str) -> dict:
    """Run ``memfit ARGS`` in a new process; its last stdout line as JSON. ``memfit profile`` fixes
    glibc's mmap threshold for the rest of its process, which would slow every later test here."""
    import os

    result = subprocess.run([sys.executable, "-m", "memfit.cli.main", *args], capture_output=True, text=True,
                            check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


MEMORY_KEYS = {"peak_bytes", "by_category", "by_module"}
CATEGORY_KEYS = {"parameters", "buffers", "gradients", "optimizer_state", "activations", "kv_cache", "temporary"}


def test_estimate_json_contract_matches_profile_and_profile_tracks_the_rss_growth(capsys):
    # A training step of tiny-llama big enough (batch 32 x 1024 tokens) that the RSS growth is far
    # above the noise; `memfit profile` in its own process, so the RSS is the workload's alone (and
    # because profile tunes the allocator for the rest of its process).
    args = ["--model", "tiny-llama", "--mode", "train", "--batch", "32", "--seq", "1024", "--recipe", "checkpointing"]
    assert main(["estimate", *args, "--json"]) == 0
    predicted = _last_json(capsys)
    assert set(predicted) == MEMORY_KEYS and set(predicted["by_category"]) == CATEGORY_KEYS
    assert len(predicted["by_module"]) == 20 and all(len(row) == 2 for row in predicted["by_module"])
    measured = _memfit_json("profile", *args, "--json")
    assert set(measured) == MEMORY_KEYS | {"peak_rss_bytes", "rss_growth_bytes", "tracked_growth_bytes"}
    assert predicted == {k: measured[k] for k in MEMORY_KEYS}
    assert measured["tracked_growth_bytes"] == measured["peak_bytes"] - 361_792
    assert measured["rss_growth_bytes"] > 100e6
    assert measured["tracked_growth_bytes"] >= 0.9 * measured["rss_growth_bytes"]


def test_estimate_optimizer_flag_is_the_recipe_token(capsys):
    base = ["estimate", "--model", "tiny-llama", "--mode", "train", "--seq", "32", "--json"]
    assert main([*base, "--optimizer", "sgd"]) == 0
    flag = _last_json(capsys)
    assert main([*base, "--recipe", "sgd"]) == 0
    assert _last_json(capsys) == flag
    # SGD with momentum: one buffer per parameter, no step counters
    assert flag["by_category"]["optimizer_state"] == 361_728
    assert main([*base, "--recipe", "sgd", "--optimizer", "adamw"]) == 2
    _one_line_error(capsys, "uses 'optimizer' twice", "keep one token per strategy")


def test_estimate_budget_prints_the_largest_batch(capsys):
    base = ["estimate", "--model", "tiny-llama", "--mode", "train", "--seq", "32"]
    assert main([*base, "--budget", "2.5MB", "--json"]) == 0
    batch = _last_json(capsys)["max_batch_size"]
    at = lambda b: (main([*base, "--batch", str(b), "--json"]), _last_json(capsys)["peak_bytes"])[1]
    assert batch > 1 and at(batch) <= 2_500_000 < at(batch + 1)
    assert main([*base, "--budget", "2.5MB"]) == 0
    assert f"largest batch under 2.5 MB: {batch}" in capsys.readouterr().out
    assert main([*base, "--budget", "10KB"]) == 2
    _one_line_error(capsys, "batch size 1 needs", "over the budget of 10 KB")


def test_estimate_from_a_bundled_config_in_fp32_and_bf16(capsys):
    base = ["estimate", "--model", "llama-3-8b", "--json"]
    assert main(base) == 0
    fp32 = _last_json(capsys)["by_category"]["parameters"]
    assert main([*base, "--recipe", "bf16"]) == 0
    assert _last_json(capsys)["by_category"]["parameters"] * 2 == fp32 == 4 * 8_030_261_248


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_report_has_the_timeline_plot(capsys, tmp_path, suffix):
    report = tmp_path / f"memory{suffix}"
    args = ["estimate", "--model", "tiny-llama", "--mode", "generate", "--seq", "16", "--new-tokens", "4"]
    assert main([*args, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and f"report: {report}" in out
    data = report.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG")
    else:
        assert b"data:image/png;base64," in data and b"kv_cache" in data
    assert list(tmp_path.iterdir()) == [report]  # no temporary file left


def test_memory_cli_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert main(["estimate", "--model", "llama-9"]) == 2
    _one_line_error(capsys, "'llama-9' not found", "bundled config")
    assert main(["profile", "--model", "tiny-llama", "--recipe", "int3"]) == 2
    _one_line_error(capsys, "unknown recipe token 'int3'")
    assert main(["estimate", "--model", "tiny-llama", "--report", str(tmp_path / "r.txt")]) == 2
    _one_line_error(capsys, "neither .html nor .png")
    assert not (tmp_path / "r.txt").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--model", "tiny-llama", "--batch", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("streamed", [False, True], ids=["loaded", "streamed"])
def test_compress_with_gptq_calibrates_and_reloads(capsys, tmp_path, streamed):
    ref = "tiny-llama"
    if streamed:  # a safetensors directory is read layer by layer
        from memfit.models import tiny

        model, tokenizer = tiny.tiny_model("tiny-llama")
        ref = str(tmp_path / "hf")
        model.save_pretrained(ref)
        tokenizer.save_pretrained(ref)
    out = tmp_path / "gptq"
    args = ["compress", "--model", ref, "--recipe", "int4-g32-gptq", "--calibration-windows", "4",
            "--out", str(out), *TOKENS, "--json"]
    assert main(args) == 0
    data = _last_json(capsys)
    # the prediction printed before the run (fake tensors) and the tracked peak of the run itself
    predicted, tracked = data["predicted_calibration_bytes"], data["calibration_peak_bytes"]
    assert tracked > 0 and abs(predicted / tracked - 1) <= 0.01, (predicted, tracked)
    compressed = data["metrics"]
    assert main(["eval", "--model", str(out), *TOKENS, "--json"]) == 0
    reloaded = _last_json(capsys)
    assert reloaded["weight_bytes"] == compressed["weight_bytes"]
    assert reloaded["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-6)


def test_missing_calibration_text_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    args = ["compress", "--model", "tiny-llama", "--recipe", "int8-gptq", "--calibration-text",
            str(tmp_path / "none.txt"), "--out", str(out)]
    assert main(args) == 2
    _one_line_error(capsys, "none.txt' does not exist")
    assert not out.exists()


def test_calibration_memory_is_predicted_and_max_memory_refuses_to_start(capsys, tmp_path):
    out = tmp_path / "out"
    args = ["compress", "--model", "tiny-llama", "--recipe", "int4-g32-gptq", "--calibration-windows", "4",
            "--out", str(out), *TOKENS]
    assert main([*args, "--max-memory", "100KB"]) == 2
    _one_line_error(capsys, "calibrating 'int4-g32-gptq' is predicted to need ", "more than --max-memory 100 KB",
                    "fewer --calibration-windows")
    assert not out.exists()
    assert main([*args, "--max-memory", "1GB", "--json"]) == 0
    err = capsys.readouterr().err
    assert "calibration: 4 windows of 512 tokens, model loaded; predicted peak" in err
    assert (out / "memfit.json").exists()


def test_export_format_target_is_checked_before_any_work(capsys, tmp_path):
    out = tmp_path / "model.bin"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int8", "--format", "gguf-q8_0",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "does not end in .gguf", "name the file")
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["gguf-q8_0", "compressed-tensors"])
def test_exports_refuse_sparse_layers_before_any_work(capsys, tmp_path, fmt):
    out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "m")
    assert main(["compress", "--model", "tiny-llama", "--recipe", "prune-50-magnitude,int8", "--format", fmt,
                 "--out", str(out)]) == 2
    _one_line_error(capsys, f"{fmt} cannot hold the layers 'prune-50-magnitude' makes", "--format memfit")
    assert not out.exists()


def test_compress_exports_gguf(capsys, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "tiny.gguf"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int8", "--format", "gguf-q8_0",
                 "--out", str(out), *TOKENS, "--json"]) == 0
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_unreadable_max_memory_is_one_line_exit_2_before_loading(capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tmp_path / "nope"), "--recipe", "int8-gptq", "--max-memory", "lots",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "cannot read size 'lots'")  # not the missing model: nothing was loaded
    assert not out.exists()
