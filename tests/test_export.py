"""memfit.export: compressed-tensors directories load in plain transformers (in a process without
memfit) and compute memfit's logits; GGUF files hold llama.cpp's names, shapes and types and load
back through transformers' GGUF loader within measured bounds."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import gguf
import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel

import memfit
from memfit.errors import OutputError
from memfit.export import GgufKind, Int4Strategy, export_compressed_tensors, export_gguf
from memfit.models.gguf import load_gguf
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.packed import Int4Linear, Int8Linear
from memfit.strategies.quantize.rtn import int4_linear_from, int8_linear_from

needs_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="needs compressed-tensors (Python 3.11+)"
)


@contextlib.contextmanager
def dequantize_path():
    """memfit's packed CPU kernels compute in bf16; exported weights are compared on memfit's
    fp32 dequantize path, which is the one the loaders take."""
    saved = kernels.INT4_KERNEL_MAX_ROWS, kernels.INT8_KERNEL_MAX_ROWS
    kernels.INT4_KERNEL_MAX_ROWS = kernels.INT8_KERNEL_MAX_ROWS = 0
    try:
        yield
    finally:
        kernels.INT4_KERNEL_MAX_ROWS, kernels.INT8_KERNEL_MAX_ROWS = saved


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), dequantize_path():
        return model(tokens).logits


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def mixed_qwen2(make_tiny):
    """tiny-qwen2 (q/k/v biases, untied head) with int4 at two group sizes, int8 (head included) and float layers."""
    model, tokenizer = make_tiny("tiny-qwen2")
    layer0, layer1 = model.model.layers
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(layer0.self_attn, proj, int4_linear_from(getattr(layer0.self_attn, proj), 32))
    for proj in ("q_proj", "k_proj", "v_proj"):
        setattr(layer1.self_attn, proj, int4_linear_from(getattr(layer1.self_attn, proj), 64))
    for mlp in (layer0.mlp, layer1.mlp):
        mlp.gate_proj, mlp.up_proj = int8_linear_from(mlp.gate_proj), int8_linear_from(mlp.up_proj)
    layer1.mlp.down_proj = int4_linear_from(layer1.mlp.down_proj, 32)
    model.lm_head = int8_linear_from(model.lm_head)
    # left float: layer0.mlp.down_proj, layer1.self_attn.o_proj, the embedding
    return model, tokenizer


# Runs in a fresh interpreter: loads each exported directory with transformers alone.
LOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    tokens = torch.load(sys.argv[1])
    result = {}
    for out in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(out)
        q_proj = model.model.layers[0].self_attn.q_proj
        packed = sorted(name for name, _ in q_proj.named_parameters())
        with torch.no_grad():
            torch.save(model(tokens).logits, out + "/logits.pt")
        result[out] = {"q_proj_params_at_load": packed}
    result["memfit_imported"] = "memfit" in sys.modules
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def ct_exports(tmp_path_factory):
    """Three exports (int4, int8, mixed), all loaded by one transformers subprocess:
    ``({name: (dir, memfit logits, model)}, the subprocess's report)``."""
    from memfit.models import tiny

    root = tmp_path_factory.mktemp("ct")
    tokens = torch.randint(0, tiny.VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(1))
    int4, tok = tiny.tiny_model("tiny-llama")  # each call builds a fresh seeded model
    memfit.apply(int4, memfit.Plan.parse("int4-g32"))
    int8, _ = tiny.tiny_model("tiny-llama")
    memfit.apply(int8, memfit.Plan.parse("int8"))
    mixed, qtok = mixed_qwen2(tiny.tiny_model)
    exports = {}
    for name, model, tokenizer in [("int4", int4, tok), ("int8", int8, tok), ("mixed", mixed, qtok)]:
        exports[name] = (export_compressed_tensors(model, tokenizer, root / name), logits(model, tokens), model)
    torch.save(tokens, root / "tokens.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", LOADER, str(root / "tokens.pt"), *(str(d) for d, _, _ in exports.values())]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return exports, report


@needs_ct
@pytest.mark.parametrize("name", ["int4", "int8", "mixed"])
def test_compressed_tensors_export_loads_without_memfit_and_gives_memfit_logits(ct_exports, name):
    exports, report = ct_exports
    out, expected, _ = exports[name]
    assert report["memfit_imported"] is False
    # the layer was built from the file's packed tensors (transformers dequantizes them at the first forward)
    assert "weight_packed" in report[str(out)]["q_proj_params_at_load"]
    got = torch.load(out / "logits.pt")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@needs_ct
def test_int4_export_config_and_packed_tensors(ct_exports):
    out, _, model = ct_exports[0]["int4"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized" and config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]  # the head is tied to the (dequantized) embedding
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "block", "block_structure": [1, 32],
        "group_size": None, "dynamic": False,
    }
    q_proj: Int4Linear = model.model.layers[0].self_attn.q_proj
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        zero = f.get_tensor("model.layers.0.self_attn.q_proj.weight_zero_point")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_shape").tolist() == [64, 64]
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert not any(k.startswith("lm_head") for k in keys)
    assert packed.dtype == torch.int32 and packed.shape == (64, 8)  # eight nibbles per word
    assert zero.dtype == torch.int8 and zero.shape == (64, 2)
    assert scale.dtype == torch.float32 and scale.shape == (64, 2)
    # value i of a word sits in bits 4i..4i+3, as memfit's unsigned code
    nibbles = torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], dim=-1).reshape(64, 64)
    assert torch.equal(nibbles.to(torch.uint8), q_proj.layout.unpack(q_proj.qweight))
    assert torch.equal(zero + 8, q_proj.zero_point.t().to(torch.int8))
    assert torch.equal(scale, q_proj.scale.t().float())
    assert torch.equal(embedding, model.model.embed_tokens.dequantize(torch.float32))


@needs_ct
def test_mixed_export_lists_each_layer_under_its_scheme(ct_exports):
    out, _, _ = ct_exports[0]["mixed"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    schemes = {
        (g["weights"]["num_bits"], g["weights"]["strategy"], tuple(g["weights"].get("block_structure") or ())):
            sorted(g["targets"]) for g in config["config_groups"].values()
    }
    attn = lambda i, *names: [f"model.layers.{i}.self_attn.{n}" for n in names]  # noqa: E731
    int8 = ["lm_head"] + [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    g32 = attn(0, "q_proj", "k_proj", "v_proj", "o_proj") + ["model.layers.1.mlp.down_proj"]
    assert schemes == {
        (4, "block", (1, 32)): sorted(g32),
        (4, "block", (1, 64)): sorted(attn(1, "q_proj", "k_proj", "v_proj")),
        (8, "channel", ()): sorted(int8),
    }
    assert sorted(config["ignore"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight_packed").shape == (256, 16)  # int8: four per word
        assert f.get_tensor("lm_head.weight_scale").shape == (256, 1)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").shape == (64,)
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.float32


@needs_ct
def test_group_strategy_packs_zero_points_and_decompresses_to_memfit_weights(make_tiny, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, memfit.Plan.parse("int4-g32"))
    out = export_compressed_tensors(model, tokenizer, tmp_path / "w4", int4_strategy=Int4Strategy.GROUP)
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    prefix = "model.layers.1.mlp.gate_proj."
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    assert state["weight_zero_point"].dtype == torch.int32 and state["weight_zero_point"].shape == (16, 2)
    weight = PackedQuantizationCompressor.decompress(state, QuantizationScheme.model_validate(group))["weight"]
    assert torch.equal(weight, model.model.layers[1].mlp.gate_proj.dequantize(torch.float32))


@needs_ct
def test_compressed_tensors_export_refuses_foreign_directory_and_replaces_its_own(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, memfit.Plan.parse("int8"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty and was not written by memfit"):
        export_compressed_tensors(model, tokenizer, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = export_compressed_tensors(model, tokenizer, tmp_path / "mine")
    export_compressed_tensors(model, tokenizer, out)  # a second export replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "mine"]  # no temp dirs left


@needs_ct
def test_compressed_tensors_export_refuses_short_last_group(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    model.model.layers[0].mlp.up_proj = int4_linear_from(model.model.layers[0].mlp.up_proj, 48)  # 64 = 48 + 16
    with pytest.raises(OutputError, match=r"'model\.layers\.0\.mlp\.up_proj' has int4 groups of 48"):
        export_compressed_tensors(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_ct
def test_compressed_tensors_export_refuses_packed_modules_it_does_not_cover(make_tiny, tmp_path):
    class ActivationRounding(Int8Linear):  # like W8A8's Int8DynamicLinear: same tensors, other arithmetic
        pass

    model, tokenizer = make_tiny("tiny-llama")
    plain = int8_linear_from(model.model.layers[1].mlp.up_proj)
    model.model.layers[1].mlp.up_proj = ActivationRounding(plain.qweight, plain.scale)
    with pytest.raises(OutputError, match=r"'model\.layers\.1\.mlp\.up_proj' is a ActivationRounding"):
        export_compressed_tensors(model, tokenizer, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_compressed_tensors_export_without_the_package_names_the_extra(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # makes the import fail
    with pytest.raises(OutputError, match=r"needs the 'compressed-tensors' package.*pip install 'memfit\[export\]'"):
        export_compressed_tensors(*make_tiny("tiny-llama"), tmp_path / "out")
    assert not list(tmp_path.iterdir())


@needs_ct
@pytest.mark.parametrize(("bits", "cols"), [(4, 64), (8, 64), (4, 12)])  # 12 x 4 bits: not whole words
def test_packing_matches_compressed_tensors(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from memfit.export.compressed_tensors import _words

    unsigned = torch.randint(0, 1 << bits, (6, cols), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    signed = (unsigned.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(_words(unsigned, bits), pack_to_int32(signed, bits))


# -- GGUF ---------------------------------------------------------------------------------------
LLAMA_NAMES = {"token_embd.weight", "output_norm.weight"} | {
    f"blk.{i}.{part}.weight" for i in (0, 1) for part in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"
    )
}


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_holds_llama_cpp_names_shapes_and_types(make_tiny, tmp_path, kind):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, memfit.Plan.parse("int4-g32"))
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", kind))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == LLAMA_NAMES  # tied head: no output.weight
    shapes = {name: tuple(int(d) for d in t.shape) for name, t in tensors.items()}  # GGUF order: [K, N]
    assert shapes["token_embd.weight"] == (64, 256)
    assert shapes["blk.0.attn_k.weight"] == (64, 32)
    assert shapes["blk.1.ffn_down.weight"] == (128, 64)
    assert shapes["output_norm.weight"] == (64,)
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["token_embd.weight"] == "Q8_0"  # kept at 8 bits in Q4_0 files too
    assert {types[n] for n in LLAMA_NAMES if "norm" in n} == {"F32"}
    assert {types[n] for n in LLAMA_NAMES if "norm" not in n and n != "token_embd.weight"} == {kind}
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "gpt2"
    assert field("general.file_type") == {"Q8_0": 7, "Q4_0": 2}[kind]
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16


def test_gguf_f32_round_trip_is_exact(make_tiny, tokens, tmp_path):
    # No re-rounding: proves the names, the q/k permutation and the metadata invert exactly.
    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, memfit.Plan.parse("int4-g32"))
    loaded, loaded_tokenizer = load_gguf(export_gguf(model, tokenizer, tmp_path / "m.gguf", GgufKind.F32))
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-5, atol=1e-6)
    text = "memfit exports GGUF, 2 ways!"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_gguf_requantization_costs_no_more_than_memfit_quantization(make_tiny, tokens, tmp_path, name):
    # Bound, measured on these seeded models: re-rounding memfit's weights into llama.cpp's blocks
    # moves the logits less than memfit's own rounding moved them from fp32 (Q8_0 of int8: 0.5% vs
    # 0.9%; Q4_0 of int4-g32: 5% vs 7%); fp32 -> Q4_0 lands near memfit's int4-g32 (8% vs 7%).
    base, tokenizer = make_tiny(name)
    fp32 = logits(base, tokens)
    for recipe, kind in [("int8", "Q8_0"), ("int4-g32", "Q4_0")]:
        model = copy.deepcopy(base)
        memfit.apply(model, memfit.Plan.parse(recipe))
        own = logits(model, tokens)
        requantized = logits(load_gguf(export_gguf(model, tokenizer, tmp_path / f"{recipe}.gguf", kind))[0], tokens)
        from_fp32 = logits(load_gguf(export_gguf(base, tokenizer, tmp_path / f"f-{kind}.gguf", kind))[0], tokens)
        assert 0 < rel_err(requantized, own) < rel_err(own, fp32), (recipe, kind)
        assert 0 < rel_err(from_fp32, fp32) < 1.5 * rel_err(own, fp32), (recipe, kind)


def test_gguf_rejects_unknown_kind_other_architectures_and_foreign_files(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    with pytest.raises(OutputError, match="GGUF kind 'Q5_K' is not supported; use one of Q8_0, Q4_0, F16, F32"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "Q5_K")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64))
    with pytest.raises(OutputError, match="covers llama, qwen2 models; this model is 'gpt2'"):
        export_gguf(gpt2, tokenizer, tmp_path / "m.gguf", "Q8_0")
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not a model")
    with pytest.raises(OutputError, match="exists and is not a GGUF file"):
        export_gguf(model, tokenizer, foreign, "Q8_0")
    with pytest.raises(OutputError, match=r"does not end in \.gguf"):
        export_gguf(model, tokenizer, tmp_path / "m.bin", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"]  # nothing written, no temp files
    assert foreign.read_text() == "not a model"


# -- the demo -----------------------------------------------------------------------------------
@needs_ct
@pytest.mark.slow
def test_demo_int4_compressed_tensors_export_keeps_perplexity(demo, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = copy.deepcopy(demo[0]), demo[1]
    memfit.apply(model, memfit.Plan.parse("int4-g128"))
    expected = memfit.evaluate(model, tokenizer, num_tokens=2048, measure_speed=False).perplexity
    out = export_compressed_tensors(model, tokenizer, tmp_path / "demo-w4")
    del model
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = memfit.evaluate(loaded, tokenizer, num_tokens=2048, measure_speed=False).perplexity
    # memfit's default path runs the bf16 int4 kernel; transformers dequantizes to fp32 (measured: 1.3e-4 apart)
    assert got == pytest.approx(expected, rel=1e-3)
