"""Mixed formats per block: sensitivity runs, the exact allocation, the budget, and recorded choices."""

import itertools
import random

import pytest
import torch

import memfit
from memfit.strategies import MixedBits
from memfit.strategies.quantize.calibrated import Method
from memfit.strategies.quantize.mixed import allocate, block_options, units_of


def _brute_force(costs, scores, cap):
    fitting = [c for c in itertools.product(*[sorted(u) for u in costs])
               if sum(u[k] for u, k in zip(costs, c, strict=True)) <= cap]
    return min(sum(s[k] for s, k in zip(scores, c, strict=True)) for c in fitting)


def test_allocation_is_the_exact_optimum_within_the_cap():
    rng = random.Random(0)
    for _ in range(200):
        units = rng.randint(1, 5)
        costs = [{k: rng.randint(1, 40) for k in "abcd"[: rng.randint(1, 4)]} for _ in range(units)]
        scores = [{k: rng.random() for k in c} for c in costs]
        cap = rng.randint(sum(min(c.values()) for c in costs), sum(max(c.values()) for c in costs))
        chosen = allocate(costs, scores, cap)
        assert sum(c[k] for c, k in zip(costs, chosen, strict=True)) <= cap
        assert sum(s[k] for s, k in zip(scores, chosen, strict=True)) == pytest.approx(_brute_force(costs, scores, cap))


def test_allocation_beats_the_greedy_ratio_where_it_strands_bytes():
    # the best ratio (unit 0's 'b': 1.0 per byte) leaves 9 bytes that buy nothing; unit 1's 'b'
    # (0.9 per byte, 10 bytes) alone removes more
    costs = [{"a": 0, "b": 2}, {"a": 0, "b": 10}]
    scores = [{"a": 2.0, "b": 0.0}, {"a": 9.0, "b": 0.0}]
    assert allocate(costs, scores, cap=11) == ["a", "b"]
    assert allocate(costs, scores, cap=12) == ["b", "b"]
    assert allocate(costs, scores, cap=1) == ["a", "a"]


def test_allocation_of_large_costs_fits_and_is_near_the_optimum():
    rng = random.Random(1)
    costs = [{k: rng.randint(10**6, 10**7) for k in "abc"} for _ in range(6)]
    scores = [{k: rng.random() for k in c} for c in costs]
    cap = sum(sorted(c.values())[1] for c in costs)
    chosen = allocate(costs, scores, cap)
    assert sum(c[k] for c, k in zip(costs, chosen, strict=True)) <= cap
    # costs rounded up to steps of slack / 65,536 give up at most a step per unit
    step = (cap - sum(min(c.values()) for c in costs)) / 65536
    best_within = _brute_force(costs, scores, cap - 6 * step)
    assert sum(s[k] for s, k in zip(scores, chosen, strict=True)) <= best_within + 1e-12


def test_units_are_attention_and_mlp_of_each_layer(make_tiny):
    model, _ = make_tiny("tiny-llama")
    units = units_of(model, memfit.Targets())
    assert [(i, [fqn.rsplit(".", 1)[-1] for fqn, _ in unit]) for i, unit in units] == [
        (0, ["q_proj", "k_proj", "v_proj", "o_proj"]), (0, ["gate_proj", "up_proj", "down_proj"]),
        (1, ["q_proj", "k_proj", "v_proj", "o_proj"]), (1, ["gate_proj", "up_proj", "down_proj"]),
    ]
    q = model.model.layers[0].self_attn.q_proj  # 64 x 64
    options = block_options()
    assert list(options) == ["int8", "int4-g32", "int4-g64", "int4-g128", "float"]
    assert options["int4-g32"].nbytes(q) == 64 * 32 + 3 * 64 * 2
    assert options["int4-g64"].nbytes(q) == options["int4-g128"].nbytes(q) == 64 * 32 + 3 * 64 * 1
    assert options["int8"].nbytes(q) == 64 * 64 + 2 * 64
    assert options["float"].nbytes(q) == 64 * 64 * 4
    for option in options.values():  # what the option makes holds what it counts
        assert memfit.weight_bytes(option.make(q, None)) == option.nbytes(q)


def _calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("bits", [4.5, 6.0, 16.0])
def test_measured_choices_fit_the_bits_and_are_recorded(make_tiny, bits):
    model, _ = make_tiny("tiny-llama")
    units = units_of(model, memfit.Targets())
    params = sum(m.weight.numel() for _, unit in units for _, m in unit)
    ctx = memfit.Context(calibration=_calibration())
    memfit.apply(model, memfit.Plan((MixedBits(bits=bits, method=Method.RTN),)), ctx)
    resolved = model.memfit_plan.strategies[0]
    assert len(resolved.choices) == len(units)
    options = block_options()
    held = sum(options[c].nbytes(m) for (_, unit), c in zip(units, resolved.choices, strict=True) for _, m in unit)
    assert held <= bits * params / 8
    if bits == 16.0:
        assert "float" in resolved.choices  # past int8's 8 bits, some units stay in float
    # the scores were measured once per unit and option, and the choice is their optimum
    assert len([k for k in ctx.memo if k[0] == "block-score"]) == len(units) * 4
    # the recorded choices rebuild the same model, with no calibration text
    fresh, _ = make_tiny("tiny-llama")
    assert memfit.estimate(fresh, memfit.Plan((resolved,))).weight_bytes == memfit.weight_bytes(model)
    assert memfit.Plan.from_dict(model.memfit_plan.to_dict()).strategies[0].choices == resolved.choices


def test_widths_of_recipes_written_before_choices_still_load(make_tiny):
    old = MixedBits.from_dict({"strategy": "mixed-bits", "version": 1, "bits": 5.0, "group_size": 64,
                               "method": "rtn", "widths": [4, 8, 16, 4], "targets": {"include": ["*"]}})
    assert old.choices == ("int4-g64", "int8", "float", "int4-g64") and old.widths == ()
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, memfit.Plan((old,)))
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.group_size == 64
    assert type(layer.mlp.up_proj).__name__ == "Int8Linear"
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)


def test_sensitivity_finds_the_unit_that_was_made_fragile(make_tiny):
    from memfit.strategies.quantize.grids import fake_quantize_int4
    from memfit.strategies.quantize.sensitivity import sensitivity_table

    model, _ = make_tiny("tiny-llama")
    with torch.no_grad():  # one MLP with a few huge weights: 4-bit groups lose the small ones
        model.model.layers[1].mlp.down_proj.weight[:, :2] *= 200
    units = [(i, [m for _, m in unit]) for i, unit in units_of(model, memfit.Targets())]
    table = sensitivity_table(model, [w[None] for w in _calibration()], units, [lambda w: fake_quantize_int4(w, 32)])
    kl = [row[0] for row in table]
    assert all(k > 0 for k in kl)
    assert max(range(len(kl)), key=kl.__getitem__) == 3  # layer 1's MLP


def test_widths_for_another_model_are_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=r"choices for 3 units, the model has 4"):
        memfit.apply(model, memfit.Plan((MixedBits(widths=(4, 8, 4), method=Method.RTN),)))
    with pytest.raises(memfit.RecipeError, match=r"choices must be among .*got \['int3'\]"):
        MixedBits.from_dict({"strategy": "mixed-bits", "choices": ["int3", "int8"]})


def test_mixed_bits_without_calibration_text_says_how_to_get_it(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(memfit.RecipeError, match=r"mixed-bits needs calibration text .*memfit compress"):
        memfit.apply(model, "mixed-bits")


def test_planner_offers_a_mixed_plan_sized_to_a_budget_between_int4_and_float(make_tiny):
    model, _ = make_tiny("tiny-llama")
    int4, int8 = memfit.estimate(model, "int4-g32").weight_bytes, memfit.estimate(model, "int8").weight_bytes
    budget = (int4 + int8) // 2
    (option,) = MixedBits.budget_options(model, budget, memfit.Workload())
    assert 4 < option.bits < 8
    assert memfit.estimate(model, memfit.Plan((option,))).weight_bytes <= budget
    (wide,) = MixedBits.budget_options(model, int8 * 2, memfit.Workload())  # past int8: some blocks in float
    assert 8 < wide.bits < 32 and memfit.estimate(model, memfit.Plan((wide,))).weight_bytes <= int8 * 2
    assert MixedBits.budget_options(model, memfit.weight_bytes(model), memfit.Workload()) == []  # all float fits
    assert MixedBits.budget_options(model, int4 // 2, memfit.Workload()) == []
