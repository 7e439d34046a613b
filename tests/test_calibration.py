"""Calibrated quantization: GPTQ's rounding, the layer-by-layer runner, and the strategies using them."""

import pytest
import torch

import memfit
from memfit.calibration.gptq import gptq_round
from memfit.calibration.layerwise import calibrate_layers, capture_first_layer_inputs
from memfit.strategies.quantize.rtn import quantize_int4_groups, quantize_int8_rows
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
    from memfit.calibration.gptq import GptqSettings

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
    from memfit.calibration.gptq import GptqSettings

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
