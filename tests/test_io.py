import json

import pytest
import torch

import memfit
from memfit.errors import CheckpointError, OutputError


def test_plain_and_cast_outputs_load_with_transformers_alone(make_tiny, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, "bf16")
    memfit.save(model, tokenizer, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, model(tokens).logits)


def test_save_records_recipe_and_notes(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    ctx = memfit.Context()
    memfit.apply(model, "int4-g128,bf16", ctx)
    memfit.save(model, tokenizer, tmp_path / "out", notes=ctx.notes)
    manifest = json.loads((tmp_path / "out" / "memfit.json").read_text())
    assert memfit.Plan.from_dict(manifest["plan"]).recipe == "int4-g128,bf16"
    assert manifest["notes"] == ctx.notes and manifest["tied"] == {
        "lm_head.qweight": "model.embed_tokens.qweight",
        "lm_head.scale": "model.embed_tokens.scale",
    }


def test_failed_save_leaves_nothing_behind(make_tiny, tmp_path, monkeypatch):
    model, tokenizer = make_tiny("tiny-llama")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        memfit.save(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_its_own_output_but_not_foreign_directories(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.save(model, tokenizer, tmp_path / "out")
    memfit.apply(model, "int8")
    memfit.save(model, tokenizer, tmp_path / "out")
    assert memfit.load(tmp_path / "out")[0].memfit_plan.recipe == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not empty and was not written by memfit"):
        memfit.save(model, tokenizer, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_a_command_may_replace_the_files_it_wrote_and_nothing_else(tmp_path):
    from memfit.io import check_output_dir

    own = ("plan.yaml", "report.md")
    out = tmp_path / "plan"
    out.mkdir()
    (out / "plan.yaml").write_text("strategies: []")
    (out / "report.md").write_text("# report")
    check_output_dir(out, own=own)  # a rerun of the command that wrote them
    with pytest.raises(OutputError, match="not empty and was not written by memfit"):
        check_output_dir(out)  # another command's
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and was not written by memfit"):
        check_output_dir(out, own=own)


def test_corrupt_weights_are_a_checkpoint_error(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.save(model, tokenizer, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        memfit.load(tmp_path / "out")


def test_missing_weights_are_a_checkpoint_error(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.save(model, tokenizer, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        memfit.load(tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": memfit.Plan.parse("int8").to_dict()}, "does not match its recipe"),
        ({"format_version": 7}, "memfit format 7"),
        ({"plan": {"strategies": [{"strategy": "int3"}]}}, "cannot read the recipe"),
    ],
)
def test_a_manifest_that_does_not_fit_the_weights_is_refused(make_tiny, tmp_path, change, message):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.save(model, tokenizer, tmp_path / "out")
    manifest_path = tmp_path / "out" / "memfit.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        memfit.load(tmp_path / "out")


def test_output_gets_ordinary_permissions(make_tiny, tmp_path):
    import os

    model, tokenizer = make_tiny("tiny-llama")
    out = memfit.save(model, tokenizer, tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_saved_int4_model_is_rebuilt_from_shapes_without_rounding_again(make_tiny, tmp_path, tokens, monkeypatch):
    """Loading builds the packed modules on the meta device from the recipe: the rounding search
    (which ran at save time) must not run again, and the loaded model computes what was saved."""
    import memfit
    from memfit.strategies.quantize import grids

    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, "int4-g32")
    memfit.save(model, tokenizer, tmp_path / "int4")
    with torch.no_grad():
        expected = model(tokens).logits

    def no_rounding(*args):
        raise AssertionError("the 4-bit grid search ran while loading")

    monkeypatch.setattr(grids, "_round_int4", no_rounding)
    loaded, _ = memfit.load(tmp_path / "int4")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)


def test_the_tokenizer_loads_alone_and_the_model_without_it(make_tiny, tmp_path):
    from memfit.errors import ModelNotFoundError
    from memfit.io import load_tokenizer

    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, "int8")
    memfit.save(model, tokenizer, tmp_path / "m")
    alone = load_tokenizer(tmp_path / "m")
    assert alone("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    loaded, none = memfit.load(tmp_path / "m", tokenizer=False)
    assert none is None and memfit.weight_bytes(loaded) == memfit.weight_bytes(model)
    with pytest.raises(ModelNotFoundError, match="is a config without weights"):
        load_tokenizer("llama-3-8b")
    (tmp_path / "m" / "tokenizer.json").unlink()
    (tmp_path / "m" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="cannot read the tokenizer of"):
        load_tokenizer(tmp_path / "m")
