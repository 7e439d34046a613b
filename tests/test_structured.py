"""Structured pruning (prune-mlp, prune-heads, drop-layers): shapes and config, what goes, bytes
against the prediction, standard checkpoints, generation with a KV cache, errors."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import memfit
from conftest import TINY_NAMES
from memfit.generation import _forward_keywords
from memfit.memory.report import weight_report
from memfit.models import tiny
from memfit.models.meta import meta_copy
from memfit.profile import kv_cache, profile
from memfit.strategies import DropLayers, PruneHeads, PruneMlp
from memfit.strategies.quantize.packed import Int8Linear

ALL_THREE = "drop-layers-1,prune-heads-50,prune-mlp-25"


def _calibration() -> torch.Tensor:
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


def _apply(model, recipe: str) -> memfit.Context:
    ctx = memfit.Context(calibration=_calibration())
    memfit.apply(model, recipe, ctx)
    return ctx


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


# -- recipes ------------------------------------------------------------------------------------
def test_tokens_parse_into_typed_strategies_and_order_within_the_phase():
    plan = memfit.Plan.parse("prune-mlp-25,prune-heads-25,drop-layers-4")
    assert plan.strategies == (DropLayers(num_layers=4), PruneHeads(percent=25), PruneMlp(percent=25))
    assert plan.recipe == "drop-layers-4,prune-heads-25,prune-mlp-25"
    assert plan.needs_calibration
    assert memfit.Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ("prune-mlp-95", "percent must be from 1 to 90, got 95"),
        ("prune-heads-0", "percent must be from 1 to 90"),
        ("drop-layers-0", "num_layers must be at least 1"),
    ],
)
def test_out_of_range_tokens_are_refused(token, match):
    with pytest.raises(memfit.RecipeError, match=match):
        memfit.Plan.parse(token)


def test_planner_space_offers_widths_but_no_layer_count():
    workload = memfit.Workload()
    assert PruneMlp.space(workload) == [PruneMlp(percent=25)]
    assert PruneHeads.space(workload) == []  # weights alone: prune-mlp-25 saves more for less loss
    assert PruneHeads.space(memfit.Workload(mode=memfit.Mode.GENERATE)) == [PruneHeads(percent=25)]
    assert DropLayers.space(workload) == []


# -- shapes and config --------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_NAMES)
def test_prune_mlp_shrinks_every_layer_and_the_config(make_tiny, name):
    model, _ = make_tiny(name)
    _apply(model, "prune-mlp-25")  # 32 of 128 channels
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (96, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 96)
        assert (layer.mlp.gate_proj.out_features, layer.mlp.down_proj.in_features) == (96, 96)
        assert layer.mlp.intermediate_size == 96
    assert model.config.intermediate_size == 96


@pytest.mark.parametrize("name", TINY_NAMES)
def test_prune_heads_removes_whole_groups_and_rewrites_the_config(make_tiny, name):
    model, _ = make_tiny(name)
    ctx = _apply(model, "prune-heads-25")  # 2 groups of 2 query heads: one group goes
    assert ctx.notes == [
        "prune-heads-25: removes 1 of 2 key/value groups per layer (50% of the heads; "
        "the 2 query heads of a group go together)"
    ]
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 64)
        assert (attn.head_dim, attn.num_key_value_groups) == (16, 2)
        if name == "tiny-qwen2":
            assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == attn.v_proj.bias.shape == (16,)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_drop_layers_renumbers_layers_and_trims_the_config(make_tiny, name):
    model, _ = make_tiny(name)
    _apply(model, "drop-layers-1")
    assert len(model.model.layers) == model.config.num_hidden_layers == 1
    assert model.model.layers[0].self_attn.layer_idx == 0
    assert [n for n, _ in model.named_children()] == ["model", "lm_head"]
    if name == "tiny-qwen2":
        assert model.config.layer_types == ["full_attention"]


def test_per_layer_config_lists_keep_the_kept_layers_entries():
    config = tiny.CONFIGS["tiny-qwen2"]()
    config.layer_types, config.sliding_window = ["full_attention", "sliding_attention"], 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    _make_identity(model.model.layers[0])
    _apply(model, "drop-layers-1")
    assert model.config.layer_types == ["sliding_attention"]
    assert model.model.layers[0].self_attn.sliding_window == 8


# -- what goes ----------------------------------------------------------------------------------
def _make_identity(layer) -> None:
    """Zero the layer's residual branches (o_proj, down_proj): its output equals its input."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_the_mlp_channel_that_contributes_nothing_goes_and_outputs_stay(make_tiny, tokens, name):
    model, _ = make_tiny(name)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 0] = 0  # a dry run would keep channel 0
    before = [layer.mlp.gate_proj.weight.clone() for layer in model.model.layers]
    baseline = _logits(model, tokens)
    _apply(model, "prune-mlp-1")  # exactly one channel of 128
    for layer, gate in zip(model.model.layers, before, strict=True):
        assert torch.equal(layer.mlp.gate_proj.weight, gate[1:])  # the others, in their order
    torch.testing.assert_close(_logits(model, tokens), baseline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_the_head_group_that_contributes_nothing_goes_and_outputs_stay(make_tiny, tokens, name):
    model, _ = make_tiny(name)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :32] = 0  # query heads 0 and 1 share key/value head 0
    before = [{k: v.clone() for k, v in layer.self_attn.state_dict().items()} for layer in model.model.layers]
    baseline = _logits(model, tokens)
    _apply(model, "prune-heads-50")
    for layer, old in zip(model.model.layers, before, strict=True):
        kept = layer.self_attn.state_dict()
        assert torch.equal(kept["q_proj.weight"], old["q_proj.weight"][32:])
        assert torch.equal(kept["k_proj.weight"], old["k_proj.weight"][16:])
        assert torch.equal(kept["v_proj.weight"], old["v_proj.weight"][16:])
        assert torch.equal(kept["o_proj.weight"], old["o_proj.weight"][:, 32:])
        if name == "tiny-qwen2":
            assert torch.equal(kept["q_proj.bias"], old["q_proj.bias"][32:])
            assert torch.equal(kept["v_proj.bias"], old["v_proj.bias"][16:])
    torch.testing.assert_close(_logits(model, tokens), baseline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_the_layer_that_changes_nothing_goes_and_outputs_stay(make_tiny, tokens, name):
    model, _ = make_tiny(name)
    _make_identity(model.model.layers[0])  # a dry run would drop the last layer
    last = model.model.layers[1]
    baseline = _logits(model, tokens)
    ctx = _apply(model, "drop-layers-1")
    assert list(model.model.layers) == [last]
    assert any(n.startswith("drop-layers-1: dropped decoder layers [0] of 2") for n in ctx.notes)
    torch.testing.assert_close(_logits(model, tokens), baseline, atol=1e-5, rtol=0)


def test_streamed_checkpoint_is_pruned_as_the_loaded_model(make_tiny, tmp_path):
    from memfit.models.load import load_lazy

    model, tokenizer = make_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    full, _ = memfit.load(tmp_path)
    _apply(full, ALL_THREE)
    lazy, _, source = load_lazy(tmp_path)
    memfit.apply(lazy, ALL_THREE, memfit.Context(calibration=_calibration(), source=source))
    assert lazy.state_dict().keys() == full.state_dict().keys()
    for key, tensor in lazy.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[key]), key


# -- bytes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "removed_bytes"),
    [
        ("prune-mlp-25", 4 * 2 * 32 * 3 * 64),  # 2 layers x 32 channels x (gate row, up row, down column)
        ("prune-heads-50", 4 * 2 * (32 * 64 * 2 + 16 * 64 * 2)),  # q rows and o columns, k and v rows
        ("drop-layers-1", 4 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3 + 2 * 64)),  # one whole layer
        (ALL_THREE, 361_792 - 4 * (256 * 64 + 64 + 16 + 32 * 64 * 2 + 16 * 64 * 2 + 96 * 64 * 3 + 2 * 64)),
    ],
)
def test_bytes_removed_are_exactly_the_predicted(make_tiny, recipe, removed_bytes):
    model, _ = make_tiny("tiny-llama")
    before = weight_report(model).weight_bytes
    predicted_from_real = memfit.estimate(model, recipe)
    predicted_from_meta = memfit.estimate(meta_copy(model), recipe)
    _apply(model, recipe)
    measured = weight_report(model)
    assert before - measured.weight_bytes == removed_bytes
    assert predicted_from_real == predicted_from_meta == measured


# -- checkpoints --------------------------------------------------------------------------------
_PLAIN_LOAD = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    tokens = load_file(sys.argv[1])["tokens"]
    logits = {}
    for directory in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits[directory] = model(tokens).logits
    assert "memfit" not in sys.modules
    save_file(logits, sys.argv[2])
""")


def test_saved_pruned_models_load_in_plain_transformers_and_in_memfit(make_tiny, tokens, tmp_path):
    expected = {}
    for name in TINY_NAMES:
        model, tokenizer = make_tiny(name)
        _apply(model, ALL_THREE)
        directory = str(tmp_path / name)
        memfit.save(model, tokenizer, directory)
        expected[directory] = _logits(model, tokens)
        loaded, _ = memfit.load(directory)
        assert loaded.memfit_plan.recipe == ALL_THREE
        assert torch.equal(_logits(loaded, tokens), expected[directory])
    save_file({"tokens": tokens}, str(tmp_path / "tokens.safetensors"))
    script = tmp_path / "plain_load.py"
    script.write_text(_PLAIN_LOAD)
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "tokens.safetensors"),
            str(tmp_path / "logits.safetensors"),
            *expected,
        ],
        check=True,
        capture_output=True,
    )
    plain = load_file(str(tmp_path / "logits.safetensors"))
    for directory, logits in expected.items():
        torch.testing.assert_close(plain[directory], logits, atol=1e-5, rtol=0)


def test_pruned_then_int8_saves_and_reloads_with_identical_logits(make_tiny, tokens, tmp_path):
    model, tokenizer = make_tiny("tiny-qwen2")
    _apply(model, "prune-mlp-25,int8")
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, Int8Linear) and (up.out_features, up.in_features) == (96, 64)
    memfit.save(model, tokenizer, tmp_path / "out")
    loaded, _ = memfit.load(tmp_path / "out")
    assert weight_report(loaded).weight_bytes == weight_report(model).weight_bytes
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


# -- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_NAMES)
def test_generation_with_a_static_cache_after_dropping_layers_and_heads(make_tiny, tokens, name):
    model, _ = make_tiny(name)
    _make_identity(model.model.layers[0])  # layer 0 goes: the kept layer's KV-cache slot is renumbered
    _apply(model, "drop-layers-1,prune-heads-50")
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (1, 1)
    workload = memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=2, seq_len=40, new_tokens=8)
    # keys and values: 2 x layers x kv_heads x head_dim x (prompt + new tokens, rounded up to the
    # runtime's cache step of 256) x batch x 4 bytes
    expected = 2 * 1 * 1 * 16 * 256 * 2 * 4
    assert profile(model, workload).by_category["kv_cache"] == expected
    assert memfit.estimate(model, "none", workload).by_category["kv_cache"] == expected
    # teacher-forced decoding through the static cache gives the logits of a full forward
    keyword, _ = _forward_keywords(type(model))
    cache = kv_cache(model, workload)
    with torch.no_grad():
        steps = [model(tokens[:, :40], use_cache=True, **{keyword: cache}).logits[:, -1:]]
        steps += [model(tokens[:, t : t + 1], use_cache=True, **{keyword: cache}).logits for t in range(40, 47)]
    torch.testing.assert_close(torch.cat(steps, dim=1), _logits(model, tokens)[:, 39:47], atol=1e-5, rtol=0)


def test_evaluate_measures_decode_speed_after_heads_and_layers_go(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    _apply(model, "drop-layers-1,prune-heads-50")
    metrics = memfit.evaluate(model, tokenizer, num_tokens=256, window=128, measure_speed=True)
    assert metrics.decode_tokens_per_s > 0 and metrics.perplexity > 1


# -- errors -------------------------------------------------------------------------------------
def test_dropping_as_many_layers_as_the_model_has_is_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    match = r"drop-layers-9 drops 9 of the model's 2 decoder layers; drop from 1 to 1"
    with pytest.raises(memfit.RecipeError, match=match):
        memfit.estimate(model, "drop-layers-9")
    with pytest.raises(memfit.RecipeError, match=match):
        _apply(model, "drop-layers-9")
    assert len(model.model.layers) == 2


@pytest.mark.parametrize("recipe", ["prune-mlp-25", "prune-heads-50", "drop-layers-1"])
def test_a_real_model_without_calibration_is_refused(make_tiny, recipe):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=f"{recipe} needs calibration text"):
        memfit.apply(model, recipe)


def test_pruning_a_quantized_model_is_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int8")
    with pytest.raises(memfit.RecipeError, match="runs before quantization"):
        _apply(model, "prune-mlp-25")


def test_a_single_key_value_head_cannot_be_pruned():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=256,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(memfit.RecipeError, match="has 1 key/value head, which cannot be split"):
        memfit.estimate(model, "prune-heads-25")
