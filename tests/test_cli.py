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
        "perplexity", "eval_tokens", "weight_bytes", "peak_rss_bytes", "prefill_tokens_per_s", "decode_tokens_per_s"
    }
    assert data["eval_tokens"] == 1024 and data["weight_bytes"] == 361_792


def test_compress_then_eval_gives_the_same_numbers(capsys, tmp_path):
    out = tmp_path / "int8"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int8", "--out", str(out), *TOKENS, "--json"]) == 0
    compressed = _last_json(capsys)
    assert compressed["recipe"] == "int8" and compressed["out"] == str(out)
    assert main(["eval", "--model", str(out), *TOKENS, "--json"]) == 0
    reloaded = _last_json(capsys)
    assert reloaded["weight_bytes"] == compressed["metrics"]["weight_bytes"] == 94_016
    assert reloaded["perplexity"] == pytest.approx(compressed["metrics"]["perplexity"], rel=1e-6)


def test_optimize_json_contract_and_report(capsys, tmp_path):
    out, report = tmp_path / "best", tmp_path / "reports" / "r.html"
    args = ["optimize", "--model", "tiny-llama", "--budget", "30%", "--out", str(out), "--report", str(report)]
    assert main([*args, *TOKENS, "--json"]) == 0
    data = _last_json(capsys)
    assert set(data) == {"budget_bytes", "plan", "out", "metrics", "candidates"}
    assert data["metrics"]["weight_bytes"] <= data["budget_bytes"]
    assert {"plan", "predicted_weight_bytes", "fits", "metrics"} == set(data["candidates"][0])
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
    helped = subprocess.run([str(memfit_bin), "optimize", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--max-ppl-increase" in helped.stdout and "examples:" in helped.stdout
