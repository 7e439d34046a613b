"""W8A8 (integer matmuls on int8 activations), SmoothQuant smoothing, and float8 weights."""

import pytest
import torch

import memfit
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.grids import FP8_MAX, quantize_fp8_rows, quantize_int8_rows
from memfit.testing import sqnr_db


@pytest.mark.parametrize("rows", [65, 200])
def test_w8a8_kernel_is_integer_arithmetic_on_per_token_int8_inputs(rows):
    torch.manual_seed(0)
    w, x = torch.randn(48, 96), torch.randn(rows, 96) * torch.linspace(0.1, 5, rows)[:, None]
    q, scale = quantize_int8_rows(w)
    out = kernels.int8_dynamic_linear(x, q, scale, None)
    # reference: round each row of x to int8 on its own absmax, multiply exactly in int64
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127
    xq = (x / x_scale).round()
    exact = (xq.long() @ q.long().t()).double() * x_scale.double() * scale.double()
    assert out.shape == (rows, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)
    # and the rounding of activations is what separates it from the weight-only result
    weight_only = x @ (q.float() * scale.float()[:, None]).t()
    assert not torch.allclose(out, weight_only, rtol=1e-6, atol=1e-6)
    assert sqnr_db(weight_only, out) > 30


def test_w8a8_short_inputs_take_the_weight_only_kernel():
    w, x = torch.randn(32, 64), torch.randn(3, 64)
    q, scale = quantize_int8_rows(w)
    torch.testing.assert_close(kernels.int8_dynamic_linear(x, q, scale, None), kernels.int8_linear(x, q, scale, None))


def test_fp8_rows_hit_the_format_maximum_and_round_relatively():
    w = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]
    q, scale = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.bfloat16
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((16,), FP8_MAX), rtol=2 ** -3)
    back = q.float() * scale.float()[:, None]
    # e4m3 has 3 mantissa bits: a relative error of at most 2^-4 on normal values
    normal = (w / scale.float()[:, None]).abs() > 2 ** -6
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + 1e-12)[normal].all()


def test_w8a8_and_fp8_hold_int8_bytes(make_tiny):
    model, _ = make_tiny("tiny-llama")
    int8 = memfit.estimate(model, "int8").weight_bytes
    assert memfit.estimate(model, "w8a8").weight_bytes == int8
    assert memfit.estimate(model, "fp8").weight_bytes == int8


@pytest.mark.parametrize("token", ["w8a8-smooth2", "w8a8-smooth0"])
def test_bad_smoothing_strength_is_a_recipe_error(token):
    with pytest.raises(memfit.RecipeError, match=r"smoothing .*use an alpha in \(0, 1\]"):
        memfit.Plan.parse(token)


def test_smoothing_token_round_trips():
    for token in ("w8a8", "w8a8-smooth", "w8a8-smooth0.7"):
        assert memfit.Plan.parse(token).strategies[0].token == token
    assert memfit.Plan.parse("w8a8-smooth").strategies[0].smoothing == 0.5


def test_smoothing_folds_exactly_and_evens_out_channels(make_tiny):
    from memfit.strategies.layerwise import capture_first_layer_inputs, run_layer
    from memfit.strategies.quantize.awq import scale_groups
    from memfit.strategies.quantize.smooth import smooth_layer

    model, _ = make_tiny("tiny-llama")
    with torch.no_grad():  # outlier channels, as trained models have
        model.model.embed_tokens.weight[:, :3] *= 30
    layer = model.model.layers[0]
    inputs = capture_first_layer_inputs(model, [torch.randint(0, 256, (1, 64)) for _ in range(4)])
    before = run_layer(layer, inputs)
    seen = []
    hook = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().amax(dim=(0, 1))))
    run_layer(layer, inputs[:1])
    smoothed = smooth_layer(layer, inputs, 0.5)
    run_layer(layer, inputs[:1])
    hook.remove()
    assert smoothed == [g.name for g in scale_groups(layer)]
    for (a, _), (b, _) in zip(before, run_layer(layer, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    spread = lambda channel_max: (channel_max.max() / channel_max.min()).item()
    assert spread(seen[-1]) < spread(seen[0]) / 2  # q_proj's input channels are far more even


def test_smoothing_cuts_the_w8a8_error_of_inputs_with_outlier_channels():
    from memfit.strategies.quantize.smooth import smoothing_scale

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 50  # a few channels far larger in every token, as LLM activations have
    w = torch.randn(64, 128, generator=gen) * 0.05
    exact = x @ w.t()

    def w8a8_error(x: torch.Tensor, w: torch.Tensor) -> float:
        q, scale = quantize_int8_rows(w)
        return (kernels.int8_dynamic_linear(x, q, scale, None) - exact).pow(2).mean().item()

    s = smoothing_scale(x.abs().amax(dim=0), w.abs().amax(dim=0), 0.5)
    torch.testing.assert_close((x / s) @ (w * s).t(), exact, rtol=1e-4, atol=1e-4)  # the same product
    assert w8a8_error(x / s, w * s) < w8a8_error(x, w) / 4
