"""Unstructured and N:M pruning: masks, SparseGPT, the compressed storage and its composition with
quantization. (Every example recipe also runs through the conformance suite in test_strategies.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.errors import RecipeError
from memfit.memory.report import weight_bytes, weight_report
from memfit.strategies.prune.masks import keep_mask, kept_per_row, magnitude_scores, wanda_scores
from memfit.strategies.prune.packed import SparseLinear, pack_mask, unpack_mask
from memfit.strategies.prune.sparsegpt import sparsegpt_prune
from memfit.strategies.quantize.packed import Int4Linear, Int8Linear
from memfit.strategies.quantize.rtn import int8_linear_from

CALIBRATION = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [8, 13, 64, 576])
def test_mask_packs_one_bit_per_weight_and_round_trips(k):
    keep = torch.rand(5, k, generator=_gen()) > 0.5
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-k // 8))
    assert torch.equal(unpack_mask(packed, k), keep)


@pytest.mark.parametrize(("sparsity", "group"), [(50, 0), (70, 0), (1, 0), (50, 4), (50, 8), (75, 4)])
def test_every_row_keeps_exactly_the_predicted_count(sparsity, group):
    scores = torch.rand(6, 72, generator=_gen())
    keep = keep_mask(scores, sparsity, group)
    assert (keep.sum(dim=1) == kept_per_row(72, sparsity, group)).all()
    if group:  # N in every group of M
        assert (keep.view(6, -1, group).sum(-1) == group * (100 - sparsity) // 100).all()
    # the pruned scores are the lowest of their row (or group)
    rows = scores.view(6, -1, group) if group else scores[:, None, :]
    kept = keep.view(rows.shape)
    lowest_kept = torch.where(kept, rows, torch.inf).amin(-1)
    highest_pruned = torch.where(kept, -torch.inf, rows).amax(-1)
    assert (highest_pruned <= lowest_kept).all()


@pytest.mark.parametrize("recipe", [
    "prune-50-magnitude", "prune-50-wanda", "prune-50-sparsegpt", "prune-70-sparsegpt",
    "prune-2of4-magnitude", "prune-2of4-wanda", "prune-2of4-sparsegpt", "prune-4of8-sparsegpt",
])
def test_every_method_reaches_the_declared_sparsity_in_every_linear(make_tiny, recipe):
    model, _ = make_tiny("tiny-llama")
    strategy = memfit.Plan.parse(recipe).strategies[0]
    memfit.apply(model, recipe, memfit.Context(calibration=CALIBRATION))
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == 2 * 7  # every decoder Linear of both layers, never the head
    for name, layer in sparse.items():
        keep = layer.keep_mask()  # [N, K]
        expected = kept_per_row(layer.in_features, strategy.sparsity, strategy.group)
        assert (keep.sum(dim=1) == expected).all(), name
        if strategy.group:  # N kept in every group of M consecutive inputs
            kept = strategy.group * (100 - strategy.sparsity) // 100
            assert (keep.view(keep.shape[0], -1, strategy.group).sum(-1) == kept).all(), name
        dense = layer.dense_weight()
        assert not dense[~keep].any() and layer.kept == expected


def test_kept_count_with_a_partial_group_and_rounding():
    assert kept_per_row(576, 50) == 288
    assert kept_per_row(10, 25) == 7  # 2.5 pruned rounds half up to 3
    assert kept_per_row(10, 50, group=4) == 2 * 2 + 2  # the trailing 2 inputs are kept


def test_wanda_keeps_small_weights_on_large_inputs():
    weight = torch.tensor([[0.1, 1.0, 0.9, 0.8]])
    square_sums = torch.tensor([10_000.0, 1.0, 1.0, 1.0])
    assert keep_mask(magnitude_scores(weight), 50).tolist() == [[False, True, True, False]]
    wanda = keep_mask(wanda_scores(weight, square_sums), 50)
    assert wanda[0, 0] and wanda.sum() == 2  # 0.1 x 100 outranks 0.9 x 1


def _correlated_inputs(rows: int = 2048, k: int = 64) -> torch.Tensor:
    base = torch.randn(rows, 8, generator=_gen(3))
    mixing = torch.randn(8, k, generator=_gen(4))
    return base @ mixing + 0.1 * torch.randn(rows, k, generator=_gen(5))


@pytest.mark.parametrize("group", [0, 4])
def test_sparsegpt_beats_wanda_on_the_layer_output(group):
    x = _correlated_inputs()
    weight = torch.randn(32, 64, generator=_gen(6))
    hessian = 2 * x.t() @ x / x.shape[0]
    pruned, keep = sparsegpt_prune(weight, hessian, 50, group)
    assert torch.equal(pruned == 0, ~keep | (weight == 0))
    assert (keep.sum(1) == kept_per_row(64, 50, group)).all()
    wanda = weight * keep_mask(wanda_scores(weight, (x * x).sum(0)), 50, group)
    error = lambda w: (x @ (w - weight).t()).square().mean()
    assert error(pruned) < 0.7 * error(wanda)


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    weight = torch.randn(16, 32, generator=_gen(7))
    pruned, keep = sparsegpt_prune(weight, torch.eye(32), 50, group=4)
    assert torch.equal(keep, keep_mask(magnitude_scores(weight), 50, group=4))
    assert torch.allclose(pruned, weight * keep)  # no correlation: nothing to compensate


def test_sparse_linear_computes_with_the_masked_weight_and_holds_half_the_bytes():
    linear = nn.Linear(576, 64)
    keep = keep_mask(magnitude_scores(linear.weight), 50)
    sparse = SparseLinear.from_dense(linear.weight, keep, linear.bias)
    x = torch.randn(3, 5, 576, generator=_gen())
    assert torch.equal(sparse(x), F.linear(x, linear.weight * keep, linear.bias))
    dense_bytes = 64 * 576 * 4
    held = weight_bytes(sparse) - 64 * 4  # without the bias
    assert held == 64 * 288 * 4 + 64 * 72
    assert held / dense_bytes <= 0.56
    assert sparse.sparsity == 0.5 and sparse.kept == 288


def test_sparse_int8_holds_both_savings_and_decodes_through_the_int8_kernel():
    linear = nn.Linear(576, 64, bias=False)
    keep = keep_mask(magnitude_scores(linear.weight), 50)
    sparse = SparseLinear.from_dense(linear.weight, keep, None)
    sparse.values = int8_linear_from(sparse.values)
    assert weight_bytes(sparse) / (64 * 576 * 4) <= 0.16
    codes = torch.zeros(64, 576, dtype=torch.int8).masked_scatter_(keep, sparse.values.qweight)
    reference = Int8Linear(codes, sparse.values.scale)
    for rows in (1, 200):  # decode takes the packed kernel, prefill the dequantized weight
        x = torch.randn(rows, 576, generator=_gen(rows))
        assert torch.allclose(sparse(x), reference(x), atol=1e-5, rtol=1e-4)


def test_prune_then_quantize_composes_and_round_trips(make_tiny, tokens, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    dense_linear_bytes = _decoder_linear_bytes(model)
    plan = "prune-50-sparsegpt,int8"
    predicted = memfit.estimate(model, plan).weight_bytes
    memfit.apply(model, plan, memfit.Context(calibration=CALIBRATION))
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 2 * 7 and all(isinstance(m.values, Int8Linear) for m in sparse)
    assert weight_report(model).weight_bytes == predicted
    assert _decoder_linear_bytes(model) / dense_linear_bytes <= 0.17  # bias-free: 0.625 B + scales per weight
    with torch.no_grad():
        out = model(tokens).logits
    memfit.save(model, tokenizer, tmp_path / "m")
    loaded, _ = memfit.load(tmp_path / "m")
    assert loaded.memfit_plan.recipe == plan
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, out)


def test_two_of_four_with_int4_stores_four_bit_values(make_tiny, tokens):
    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "prune-2of4-wanda,int4-g128", memfit.Context(calibration=CALIBRATION))
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(isinstance(m.values, Int4Linear) for m in sparse)
    for m in sparse:
        groups = m.keep_mask().view(m.out_features, -1, 4).sum(-1)
        assert (groups == 2).all()
    assert memfit.estimate(make_tiny("tiny-qwen2")[0], "prune-2of4-wanda,int4-g128").weight_bytes == weight_bytes(model)
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def test_calibrated_quantization_after_pruning_rounds_the_kept_values(make_tiny):
    model, _ = make_tiny("tiny-llama")
    ctx = memfit.Context(calibration=CALIBRATION)
    memfit.apply(model, "prune-50-wanda,int8-gptq", ctx)
    assert any("kept values of pruned layers" in note for note in ctx.notes)
    assert all(isinstance(m.values, Int8Linear) for m in model.modules() if isinstance(m, SparseLinear))


def test_calibrated_methods_refuse_to_run_without_text(make_tiny):
    model, _ = make_tiny("tiny-llama")
    with pytest.raises(RecipeError, match="prune-50-sparsegpt needs calibration text"):
        memfit.apply(model, "prune-50-sparsegpt")


def test_magnitude_needs_no_text_and_skips_the_head(make_tiny):
    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "prune-4of8-magnitude")
    assert type(model.get_output_embeddings()) is nn.Linear
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and all(m.sparsity == 0.5 for m in sparse)


@pytest.mark.parametrize(("token", "sparsity", "group"), [
    ("prune-50-magnitude", 50, 0), ("prune-2of4-wanda", 50, 4), ("prune-4of8-sparsegpt", 50, 8),
    ("prune-1of4-wanda", 75, 4), ("prune-70-sparsegpt", 70, 0),
])
def test_tokens_parse_and_round_trip(token, sparsity, group):
    strategy = memfit.Plan.parse(token).strategies[0]
    assert (strategy.sparsity, strategy.group) == (sparsity, group)
    assert strategy.token == token


@pytest.mark.parametrize(("token", "match"), [
    ("prune-3of8-wanda", "whole number pruned per group"),
    ("prune-4of4-wanda", "not N:M"),
    ("prune-2of5-wanda", "not N:M"),
    ("prune-100-wanda", "percent from 1 to 99"),
    ("prune-50-random", "unknown recipe token"),
])
def test_bad_tokens_are_explained(token, match):
    with pytest.raises(RecipeError, match=match):
        memfit.Plan.parse(token)


def test_pruning_conflicts_with_mixed_bits():
    with pytest.raises(RecipeError, match="conflict"):
        memfit.Plan.parse("prune-50-wanda,mixed-bits-5")


def _decoder_linear_bytes(model: nn.Module) -> int:
    return sum(weight_bytes(layer.self_attn) + weight_bytes(layer.mlp) for layer in model.model.layers)
