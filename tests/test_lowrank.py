"""Low-rank factorization: ranks, exact bytes, SVD and whitening, recorded ranks, stacking with int8."""

import pytest
import torch
from torch import nn

import memfit
from memfit.memory.report import weight_report
from memfit.strategies import LowRank, parse_token
from memfit.strategies.lowrank import (
    LowRankLinear,
    Scope,
    budget_rank,
    energy_rank,
    lowrank_linear_from,
    svd_factors,
)
from memfit.strategies.quantize.packed import Int8Linear


def _calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))


def _tokens():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


def test_budget_rank_keeps_the_percent_of_parameters():
    assert budget_rank(128, 64, 50) == 21  # 0.5 * 8192 / 192 = 21.3
    assert budget_rank(64, 128, 50) == 21
    assert budget_rank(64, 64, 50) == 16
    assert budget_rank(11008, 4096, 25) == 746  # 0.25 * 45_088_768 / 15_104 = 746.3
    assert budget_rank(2, 2, 1) == 1  # at least 1


@pytest.mark.parametrize("recipe", ["lowrank-mlp-50", "lowrank-mlp-50-act", "lowrank-all-25"])
def test_held_bytes_equal_the_estimate_exactly(make_tiny, recipe):
    model, _ = make_tiny("tiny-llama")
    predicted = memfit.estimate(model, recipe).weight_bytes
    memfit.apply(model, recipe, memfit.Context(calibration=_calibration()))
    assert weight_report(model).weight_bytes == predicted
    if recipe == "lowrank-mlp-50":
        # fp32; per layer gate/up (128 x 64) and down (64 x 128) become rank 21: 21 * 192 weights each
        assert predicted == 361_792 - 4 * 2 * 3 * (128 * 64 - 21 * 192) == 261_952
        mlp = model.model.layers[0].mlp
        assert {m.rank for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)} == {21}


def test_scope_picks_the_decoder_linears_and_never_the_embedding_or_head(make_tiny):
    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "lowrank-attn-50")
    layer = model.model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, n), LowRankLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(layer.mlp.up_proj) is nn.Linear
    model, _ = make_tiny("tiny-qwen2")
    memfit.apply(model, "lowrank-all-25")
    assert type(model.lm_head) is nn.Linear and type(model.get_input_embeddings()) is nn.Embedding
    linears = [n for n, m in model.model.layers.named_modules() if type(m) is nn.Linear]
    assert len(linears) == 2 * 7 * 2 and all(n.endswith((".down", ".up")) for n in linears)  # factors only
    q = model.model.layers[0].self_attn.q_proj
    assert q.up.bias is not None and q.down.bias is None  # the bias stays on the output side


def test_full_rank_factors_reproduce_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    x = torch.randn(16, 48)
    hessian = 2 * x.T @ x / 16
    for h in (None, hessian):
        factored = lowrank_linear_from(linear, 32, h)
        assert (factored.in_features, factored.out_features, factored.rank) == (48, 32, 32)
        torch.testing.assert_close(factored.up.weight @ factored.down.weight, linear.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(factored(x), linear(x), atol=1e-5, rtol=0)
    assert "rank=32" in repr(factored)


def test_factors_keep_the_weight_dtype():
    linear = nn.Linear(32, 32).to(torch.bfloat16)
    factored = lowrank_linear_from(linear, 4)
    assert factored.up.weight.dtype == factored.down.weight.dtype == torch.bfloat16


def test_energy_finds_the_rank_of_a_rank_three_weight(make_tiny):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 3, generator=gen) @ torch.randn(3, 56, generator=gen)
    assert energy_rank(svd_factors(weight).s, 99.9) == 3
    assert energy_rank(torch.tensor([4.0, 3.0]), 50) == 1  # the first holds 16 of 25, 64%
    assert energy_rank(torch.tensor([4.0, 3.0]), 70) == 2

    model, _ = make_tiny("tiny-llama")
    up = model.model.layers[0].mlp.up_proj  # 128 x 64
    with torch.no_grad():
        up.weight.copy_(0.1 * torch.randn(128, 3, generator=gen) @ torch.randn(3, 64, generator=gen))
    x = torch.randn(5, 64, generator=gen)
    expected = up(x)
    memfit.apply(model, "lowrank-mlp-e99.9")
    # the random full-rank Linears need more than the break-even rank, so they stay whole
    assert model.memfit_plan.strategies[0].ranks == (("model.layers.0.mlp.up_proj", 3),)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj(x), expected, atol=1e-5, rtol=1e-5)


def test_activation_aware_factors_have_lower_output_error():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 64, generator=gen) / 8)
    # channels whose scales span e^-4 .. e^4: the large ones dominate the output
    x = torch.randn(512, 64, generator=gen) * torch.linspace(-4, 4, 64).exp()
    hessian = 2 * x.T @ x / x.shape[0]
    with torch.no_grad():
        reference = linear(x)
        plain = (lowrank_linear_from(linear, 8)(x) - reference).norm()
        aware = (lowrank_linear_from(linear, 8, hessian)(x) - reference).norm()
    assert aware < 0.5 * plain


@pytest.mark.parametrize("recipe", ["lowrank-mlp-e50", "lowrank-mlp-e50-act"])
def test_energy_mode_records_ranks_that_rebuild_the_model(make_tiny, recipe, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    fresh, _ = make_tiny("tiny-llama")
    memfit.apply(model, recipe, memfit.Context(calibration=_calibration()))
    resolved = model.memfit_plan.strategies[0]
    assert resolved.token == recipe and len(resolved.ranks) == 6
    assert all(fqn.startswith("model.layers.") and ".mlp." in fqn for fqn, _ in resolved.ranks)
    assert [r for _, r in resolved.ranks] == [model.get_submodule(f).rank for f, _ in resolved.ranks]
    assert memfit.Plan.from_dict(model.memfit_plan.to_dict()).strategies[0] == resolved
    # the recorded ranks predict the bytes exactly, with no data
    assert memfit.estimate(fresh, memfit.Plan((resolved,))).weight_bytes == weight_report(model).weight_bytes

    memfit.save(model, tokenizer, tmp_path / "out")
    loaded, _ = memfit.load(tmp_path / "out")
    assert loaded.memfit_plan.strategies[0].ranks == resolved.ranks
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)


def test_lowrank_then_int8_quantizes_the_factors(make_tiny, tmp_path):
    assert memfit.Plan.parse("int8,lowrank-mlp-50").recipe == "lowrank-mlp-50,int8"  # structure first
    model, tokenizer = make_tiny("tiny-llama")
    predicted = memfit.estimate(model, "lowrank-mlp-50,int8")
    memfit.apply(model, "lowrank-mlp-50,int8")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.up_proj, LowRankLinear)
    assert isinstance(mlp.up_proj.down, Int8Linear) and isinstance(mlp.up_proj.up, Int8Linear)
    assert not [n for n, m in model.named_modules() if ".mlp" in n and type(m) is nn.Linear]
    assert weight_report(model).by_module == predicted.by_module

    memfit.save(model, tokenizer, tmp_path / "out")
    loaded, _ = memfit.load(tmp_path / "out")
    assert isinstance(loaded.model.layers[1].mlp.down_proj.up, Int8Linear)
    assert weight_report(loaded).weight_bytes == weight_report(model).weight_bytes
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("lowrank-mlp-50", LowRank(keep=50)),
        ("lowrank-attn-10-act", LowRank(scope=Scope.ATTN, keep=10, activation_aware=True)),
        ("lowrank-all-e99.9", LowRank(scope=Scope.ALL, energy=99.9)),
        ("lowrank-mlp-e90-act", LowRank(energy=90.0, activation_aware=True)),
    ],
)
def test_tokens_parse_and_print_back(token, expected):
    assert parse_token(token) == expected
    assert expected.token == token
    assert expected.needs_calibration == token.endswith("-act")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("lowrank-mlp-0", "keeps 0% of the parameters"),
        ("lowrank-mlp-100", "keeps 100% of the parameters"),
        ("lowrank-mlp-e100", "keeps 100% of the spectral energy"),
        ("lowrank-mlp-e0", "keeps 0% of the spectral energy"),
        ("lowrank-head-50", "not a low-rank token"),
        ("lowrank-mlp-50.5", "not a low-rank token"),
    ],
)
def test_bad_tokens_raise_with_a_hint(token, message):
    with pytest.raises(memfit.RecipeError, match=message) as info:
        parse_token(token)
    assert info.value.hint


def test_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="exactly one of keep and energy"):
        LowRank()
    with pytest.raises(ValueError, match="exactly one of keep and energy"):
        LowRank(keep=50, energy=90.0)
    with pytest.raises(ValueError, match="keep must be a whole percent"):
        LowRank(keep=100)
    with pytest.raises(ValueError, match="ranks must be at least 1"):
        LowRank(energy=90.0, ranks=(("model.layers.0.mlp.up_proj", 0),))
    with pytest.raises(memfit.RecipeError, match="invalid settings for strategy 'lowrank'"):
        memfit.Plan.from_dict({"strategies": [{"strategy": "lowrank", "keep": 0}]})


def test_activation_aware_needs_calibration_on_a_real_model_only(make_tiny):
    model, _ = make_tiny("tiny-llama")
    assert memfit.estimate(model, "lowrank-mlp-50-act").weight_bytes < weight_report(model).weight_bytes
    with pytest.raises(memfit.RecipeError, match="lowrank-mlp-50-act needs calibration text"):
        memfit.apply(model, "lowrank-mlp-50-act")


def test_recorded_ranks_for_another_model_are_refused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    strategy = LowRank(energy=50.0, ranks=(("model.layers.7.mlp.up_proj", 4),))
    with pytest.raises(memfit.RecipeError, match="which this model lacks"):
        memfit.apply(model, memfit.Plan((strategy,)))


@pytest.mark.parametrize("recipe", ["lowrank-mlp-50-act", "lowrank-all-e50"])
def test_streamed_factorization_equals_factoring_the_loaded_model(make_tiny, tmp_path, recipe):
    from memfit.models.load import load_lazy

    model, tokenizer = make_tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    full, _ = memfit.load(tmp_path)
    memfit.apply(full, recipe, memfit.Context(calibration=_calibration()))
    lazy, _, source = load_lazy(tmp_path)
    memfit.apply(lazy, recipe, memfit.Context(calibration=_calibration(), source=source))
    source.materialize(lazy)  # what no strategy reached (`memfit compress` does the same)
    assert lazy.memfit_plan == full.memfit_plan
    assert lazy.state_dict().keys() == full.state_dict().keys()
    for key, tensor in lazy.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[key]), key
