"""Mixed bit-widths: sensitivity runs, the greedy allocation, the budget, and recorded widths."""

import pytest
import torch

import memfit
from memfit.strategies import MixedBits
from memfit.strategies.quantize.calibrated import Method
from memfit.strategies.quantize.mixed import FLOAT, allocate, linear_bytes, units_of


def test_allocation_buys_the_most_divergence_per_byte_within_the_cap():
    costs = [{4: 10, 8: 20, FLOAT: 40}, {4: 10, 8: 20, FLOAT: 40}, {4: 100, 8: 200, FLOAT: 400}]
    gains = [{4: 0, 8: 5.0, FLOAT: 6.0}, {4: 0, 8: 1.0, FLOAT: 1.1}, {4: 0, 8: 50.0, FLOAT: 60.0}]
    assert allocate(costs, gains, cap=120) == [4, 4, 4]  # every widening would pass the cap
    assert allocate(costs, gains, cap=130) == [8, 4, 4]  # 0.5 per byte beats 0.1
    assert allocate(costs, gains, cap=230) == [8, 4, 8]
    assert allocate(costs, gains, cap=10_000) == [FLOAT, FLOAT, FLOAT]
    widths = allocate(costs, gains, cap=250)
    assert sum(c[w] for c, w in zip(costs, widths, strict=True)) <= 250


def test_units_are_attention_and_mlp_of_each_layer(make_tiny):
    model, _ = make_tiny("tiny-llama")
    units = units_of(model, memfit.Targets())
    assert [(i, [fqn.rsplit(".", 1)[-1] for fqn, _ in unit]) for i, unit in units] == [
        (0, ["q_proj", "k_proj", "v_proj", "o_proj"]), (0, ["gate_proj", "up_proj", "down_proj"]),
        (1, ["q_proj", "k_proj", "v_proj", "o_proj"]), (1, ["gate_proj", "up_proj", "down_proj"]),
    ]
    q = model.model.layers[0].self_attn.q_proj  # 64 x 64
    assert linear_bytes(q, 4, 32) == 64 * 32 + 3 * 64 * 2
    assert linear_bytes(q, 8, 32) == 64 * 64 + 2 * 64
    assert linear_bytes(q, FLOAT, 32) == 64 * 64 * 4


def _calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("bits", [4.5, 6.0, 16.0])
def test_measured_widths_fit_the_bits_and_are_recorded(make_tiny, bits):
    model, _ = make_tiny("tiny-llama")
    units = units_of(model, memfit.Targets())
    params = sum(m.weight.numel() for _, unit in units for _, m in unit)
    ctx = memfit.Context(calibration=_calibration())
    memfit.apply(model, memfit.Plan((MixedBits(bits=bits, method=Method.RTN),)), ctx)
    resolved = model.memfit_plan.strategies[0]
    assert len(resolved.widths) == len(units)
    held = sum(linear_bytes(m, w, 128) for (_, unit), w in zip(units, resolved.widths, strict=True) for _, m in unit)
    assert held <= bits * params / 8
    if bits == 16.0:
        assert FLOAT in resolved.widths  # past int8's 8 bits, some units stay in float
    # the recorded widths rebuild the same model, with no calibration text
    fresh, _ = make_tiny("tiny-llama")
    assert memfit.estimate(fresh, memfit.Plan((resolved,))).weight_bytes == memfit.weight_bytes(model)
    assert memfit.Plan.from_dict(model.memfit_plan.to_dict()).strategies[0].widths == resolved.widths


def test_sensitivity_finds_the_unit_that_was_made_fragile(make_tiny):
    from memfit.strategies.quantize.grids import fake_quantize_int4
    from memfit.strategies.quantize.sensitivity import unit_sensitivities

    model, _ = make_tiny("tiny-llama")
    with torch.no_grad():  # one MLP with a few huge weights: 4-bit groups lose the small ones
        model.model.layers[1].mlp.down_proj.weight[:, :2] *= 200
    units = [(i, [m for _, m in unit]) for i, unit in units_of(model, memfit.Targets())]
    kl = unit_sensitivities(model, [w[None] for w in _calibration()], units, lambda w: fake_quantize_int4(w, 32))
    assert all(k > 0 for k in kl)
    assert max(range(len(kl)), key=kl.__getitem__) == 3  # layer 1's MLP


def test_widths_for_another_model_are_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=r"widths for 3 units, the model has 4"):
        memfit.apply(model, memfit.Plan((MixedBits(widths=(4, 8, 4), method=Method.RTN),)))


def test_mixed_bits_without_calibration_text_says_how_to_get_it(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=r"mixed-bits needs calibration text .*memfit compress"):
        memfit.apply(model, "mixed-bits")


def test_planner_offers_a_mixed_plan_sized_to_a_budget_between_int4_and_int8(make_tiny):
    model, _ = make_tiny("tiny-llama")
    int4, int8 = memfit.estimate(model, "int4-g32").weight_bytes, memfit.estimate(model, "int8").weight_bytes
    budget = (int4 + int8) // 2
    (option,) = MixedBits.budget_options(model, budget, memfit.Workload())
    assert 4 < option.bits < 8
    assert memfit.estimate(model, memfit.Plan((option,))).weight_bytes <= budget
    assert MixedBits.budget_options(model, int8 * 2, memfit.Workload()) == []
    assert MixedBits.budget_options(model, int4 // 2, memfit.Workload()) == []
