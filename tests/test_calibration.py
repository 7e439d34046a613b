"""Calibrated quantization: GPTQ's rounding, the layer-by-layer runner, and the strategies using them."""

import pytest
import torch

import memfit
from memfit.strategies.layerwise import calibrate_layers, capture_first_layer_inputs
from memfit.strategies.quantize.gptq import gptq_round
from memfit.strategies.quantize.grids import quantize_int4_groups, quantize_int8_rows
from memfit.testing import sqnr_db


def _correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) / width**0.5
    scales = torch.logspace(-1, 1, width)  # some input channels matter far more than others
    return (torch.randn(rows, width, generator=g) @ mixing) * scales


def _int4_dequant(codes, scale, zero, group_size):
    cols = torch.arange(codes.shape[1]) // group_size
    return (codes.float() - zero.float().t()[:, cols]) * scale.float().t()[:, cols]


@pytest.mark.parametrize(("act_order", "at_most"), [(True, 0.7), (False, 0.95)])
def test_gptq_lowers_the_output_error_of_int4_groups(act_order, at_most):
    from memfit.strategies.quantize.gptq import GptqSettings

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(2048, 256)
    hessian = 2 * x.t() @ x / x.shape[0]
    rtn, scale, zero = quantize_int4_groups(weight, 32)
    codes = gptq_round(weight, hessian, scale, zero, 32, 0, 15, GptqSettings(act_order=act_order))
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    reference = x @ weight.t()
    rtn_error = (x @ _int4_dequant(rtn, scale, zero, 32).t() - reference).pow(2).mean()
    gptq_error = (x @ _int4_dequant(codes, scale, zero, 32).t() - reference).pow(2).mean()
    # visiting the most active inputs first (activation order) leaves more columns to absorb errors
    assert gptq_error < at_most * rtn_error


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    from memfit.strategies.quantize.gptq import GptqSettings

    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    q, scale = quantize_int8_rows(weight)
    zero = torch.zeros(1, 32)
    codes = gptq_round(weight, torch.eye(128), scale[None], zero, 128, -127, 127, GptqSettings(act_order=False))
    assert torch.equal(codes.to(torch.int8), q)


def test_first_layer_inputs_are_captured_per_batch(make_tiny):
    model, _ = make_tiny("tiny-llama")
    windows = torch.randint(0, 256, (3, 16))
    inputs = capture_first_layer_inputs(model, [w[None] for w in windows])
    assert len(inputs) == 3
    hidden, kwargs = inputs[0]
    assert hidden.shape == (1, 16, 64)
    assert torch.equal(hidden, model.model.embed_tokens(windows[0][None]))
    assert "position_embeddings" in kwargs and "cache" not in kwargs


def test_layers_are_processed_in_order_on_the_previous_layers_outputs(make_tiny):
    model, _ = make_tiny("tiny-llama")
    windows = torch.randint(0, 256, (2, 16))
    seen = []
    calibrate_layers(model, windows, lambda i, layer, inputs: seen.append((i, inputs[1][0].clone())),
                     memfit.Context(), "test")
    assert [i for i, _ in seen] == [0, 1]
    with torch.no_grad():
        hidden = model(windows[1][None], output_hidden_states=True).hidden_states
    assert torch.allclose(seen[0][1], hidden[0]) and torch.allclose(seen[1][1], hidden[1], atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize(("rtn", "gptq"), [("int4-g32", "int4-g32-gptq"), ("int8", "int8-gptq")])
def test_gptq_beats_round_to_nearest_on_held_out_tokens(make_tiny, name, rtn, gptq):
    calibration = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(5))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(6))
    model, _ = make_tiny(name)
    with torch.no_grad():
        reference = model(held_out).logits
    scores = {}
    for recipe in (rtn, gptq):
        quantized, _ = make_tiny(name)
        memfit.apply(quantized, recipe, memfit.Context(calibration=calibration))
        with torch.no_grad():
            scores[recipe] = sqnr_db(reference, quantized(held_out).logits)
        assert memfit.weight_bytes(quantized) == memfit.estimate(model, recipe).weight_bytes
    assert scores[gptq] > scores[rtn]


def test_calibrated_recipe_without_calibration_text_says_how_to_get_it(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=r"int4-g128-gptq needs calibration text; .*calibration_windows"):
        memfit.apply(model, "int4-g128-gptq")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_awq_scales_fold_exactly_and_change_the_weights(make_tiny, name):
    from memfit.strategies.layerwise import capture_first_layer_inputs, run_layer
    from memfit.strategies.quantize.awq import awq_scale_layer, scale_groups
    from memfit.strategies.quantize.grids import fake_quantize_int4

    model, _ = make_tiny(name)
    layer = model.model.layers[0]
    with torch.no_grad():  # make some input channels far more active, as in trained models
        model.model.embed_tokens.weight[:, :4] *= 20
    inputs = capture_first_layer_inputs(model, [torch.randint(0, 256, (1, 64)) for _ in range(4)])
    before = run_layer(layer, inputs)
    q_before = layer.self_attn.q_proj.weight.clone()
    assert [g.name for g in scale_groups(layer)] == ["qkv", "gate_up", "down"]  # o skipped: GQA widths differ
    chosen = awq_scale_layer(layer, inputs, lambda weight: fake_quantize_int4(weight, 32))
    after = run_layer(layer, inputs)
    assert set(chosen) == {"qkv", "gate_up", "down"} and max(chosen.values()) > 0
    assert not torch.equal(layer.self_attn.q_proj.weight, q_before)
    for (a, _), (b, _) in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_awq_beats_round_to_nearest_when_channels_are_uneven(make_tiny):
    calibration = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(5))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(6))

    def uneven():
        model, _ = make_tiny("tiny-llama")
        with torch.no_grad():
            model.model.embed_tokens.weight[:, :4] *= 20
        return model

    reference_model = uneven()
    with torch.no_grad():
        reference = reference_model(held_out).logits
    scores = {}
    for recipe in ("int4-g32", "int4-g32-awq"):
        model = uneven()
        memfit.apply(model, recipe, memfit.Context(calibration=calibration))
        with torch.no_grad():
            scores[recipe] = sqnr_db(reference, model(held_out).logits)
        assert memfit.weight_bytes(model) == memfit.estimate(reference_model, recipe).weight_bytes
    assert scores["int4-g32-awq"] > scores["int4-g32"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("recipe", ["int4-g32-gptq", "int4-g32-awq", "int8-gptq"])
def test_streamed_calibration_equals_calibrating_the_loaded_model(make_tiny, tmp_path, name, recipe):
    from memfit.models.load import load_lazy

    model, tokenizer = make_tiny(name)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    calibration = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
    full, _ = memfit.load(tmp_path)
    memfit.apply(full, recipe, memfit.Context(calibration=calibration))

    lazy, _, source = load_lazy(tmp_path)
    assert all(p.is_meta for p in lazy.parameters())
    memfit.apply(lazy, recipe, memfit.Context(calibration=calibration, source=source))
    assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    assert lazy.state_dict().keys() == full.state_dict().keys()
    for key, tensor in lazy.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[key]), key
    assert memfit.weight_bytes(lazy) == memfit.weight_bytes(full)
    if model.config.tie_word_embeddings:
        assert lazy.get_output_embeddings().qweight is lazy.get_input_embeddings().qweight


def test_streaming_never_holds_the_whole_float_model(make_tiny, tmp_path):
    from memfit.memory.tracker import track
    from memfit.models.load import load_lazy

    model, tokenizer = make_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    calibration = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    full, _ = memfit.load(tmp_path)
    with track(full) as tracker:
        memfit.apply(full, "int4-g32-gptq", memfit.Context(calibration=calibration))
    full_peak = tracker.report().peak_bytes
    lazy, _, source = load_lazy(tmp_path)
    with track() as tracker:
        memfit.apply(lazy, "int4-g32-gptq", memfit.Context(calibration=calibration, source=source))
    # the second layer's float weights are read only after the first layer's were packed and freed:
    # about one float layer less at the peak (less the rotary and norm tensors read up front)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert tracker.report().peak_bytes <= full_peak - 0.9 * layer_bytes


@pytest.mark.parametrize("recipe", [
    "int4-g32-gptq", "int8-gptq", "int4-g32-awq", "w8a8-smooth", "mixed-bits-6",
    # pruning and factoring, alone and followed by quantization (a second pass over the whole model)
    "prune-50-sparsegpt", "prune-50-wanda,int8", "prune-2of4-sparsegpt,int4-g32-gptq", "prune-mlp-25,int8",
    "drop-layers-1", "lowrank-mlp-50-act,int8",
])
@pytest.mark.parametrize("streamed", [False, True], ids=["loaded", "streamed"])
def test_calibration_peak_is_predicted_within_1_percent(make_tiny, tmp_path, recipe, streamed):
    """The prediction runs the calibration on fake tensors; the real run, tracked, peaks at the
    same bytes (the tiny model's 1% is a few kilobytes)."""
    from memfit.compress import predict_calibration_memory
    from memfit.memory.tracker import track
    from memfit.models.load import load_lazy

    model, tokenizer = make_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    calibration = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(7))
    source = None
    if streamed:
        model, _, source = load_lazy(tmp_path)
    plan = memfit.Plan.parse(recipe)
    predicted = predict_calibration_memory(model, plan, calibration, source=source)
    assert all(p.is_meta for p in model.parameters()) if streamed else not any(p.is_meta for p in model.parameters())
    with track(None if streamed else model) as tracker:
        memfit.apply(model, plan, memfit.Context(calibration=calibration, source=source))
        if source is not None:
            source.materialize(model)
    peak = tracker.report().peak_bytes
    assert abs(predicted.peak_bytes / peak - 1) <= 0.01, (predicted, peak)
    assert sum(predicted.parts.values()) == predicted.peak_bytes
    assert predicted.phase.startswith(plan.strategies[0].token) and " step " in predicted.phase, predicted.phase
