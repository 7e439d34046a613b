import pytest

import memfit
from memfit.data import calibration_windows
from memfit.errors import BudgetError
from memfit.evaluate import Metrics
from memfit.planner.report import render_markdown, write_reports
from memfit.planner.search import Candidate, _choose
from memfit.planner.space import candidate_plans
from memfit.strategies.base import Phase
from memfit.units import format_bytes

TOKENS = 1024


def _search(model, tokenizer, budget, **kwargs):
    """`memfit.optimize` as these tests run it: 1024 evaluation tokens, and 4 calibration windows of
    256 tokens (the default 32 of 512 is sized for real models; the search logic is the same)."""
    calibration = calibration_windows(tokenizer, windows=4, window=256)
    return memfit.optimize(model, tokenizer, budget, num_tokens=TOKENS, calibration=calibration, **kwargs)


def test_space_has_every_option_once_and_the_empty_plan_first():
    recipes = [p.recipe for p in candidate_plans()]
    assert recipes[0] == "none"
    # {none, prune-50-sparsegpt, prune-mlp-25, lowrank-mlp-50-act} x {none, int8, int4-g32/64, int4-g128-gptq}
    # x {none, bf16}
    assert len(recipes) == len(set(recipes)) == 40
    assert "int4-g128-gptq,bf16" in recipes and "int4-g128" not in recipes and "fp16" not in recipes
    assert "prune-50-sparsegpt,int8" in recipes and "prune-mlp-25,int4-g128-gptq,bf16" in recipes
    assert not any("prune-heads" in r for r in recipes)  # heads are a generation option (the KV cache)
    assert len(candidate_plans(memfit.Workload(mode=memfit.Mode.GENERATE))) == 50
    assert "fp16" in [p.recipe for p in candidate_plans(memfit.Workload(device="cuda"))]


SHARED = pytest.mark.xdist_group("planner-30")  # the tests reading `optimized` run on one pytest-xdist worker


@pytest.fixture(scope="module")
def optimized():
    """One search of tiny-llama at 30%, shared by the tests that only read its result."""
    model, tokenizer = memfit.load("tiny-llama")
    before = memfit.weight_bytes(model)
    result = _search(model, tokenizer, "30%", measure_speed=False)
    return result, memfit.weight_bytes(model) == before


@SHARED
def test_optimize_fits_the_budget_and_picks_the_lowest_perplexity(optimized):
    result, input_unchanged = optimized
    assert input_unchanged
    fitting = [c for c in result.candidates if c.fits and c.skipped is None]
    assert all(c.metrics.weight_bytes <= result.budget_bytes for c in fitting)
    assert all(c.metrics is None for c in result.candidates if not c.fits)
    assert result.best.metrics.perplexity == min(c.metrics.perplexity for c in fitting)
    assert memfit.weight_bytes(result.model) == result.best.metrics.weight_bytes <= result.budget_bytes
    assert result.model.memfit_plan == result.best.plan
    for c in fitting:
        assert c.metrics.weight_bytes == c.predicted_weight_bytes


@SHARED
def test_optimize_is_deterministic(make_tiny, optimized):
    model, tokenizer = make_tiny("tiny-llama")
    first = optimized[0]
    second = _search(model, tokenizer, "30%", measure_speed=False)
    ranking = lambda r: [(c.plan.recipe, c.predicted_weight_bytes, c.metrics and c.metrics.perplexity)
                         for c in r.candidates]
    assert ranking(first) == ranking(second)
    assert first.best.plan == second.best.plan


def test_a_larger_budget_never_gives_a_worse_plan(make_tiny):
    model, tokenizer = make_tiny("tiny-qwen2")
    budgets = ("25%", "40%", "100%")
    results = [_search(model, tokenizer, b, measure_speed=False) for b in budgets]
    ppl = [r.best.metrics.perplexity for r in results]
    assert ppl[0] >= ppl[1] >= ppl[2]
    assert [c.fits for c in results[2].candidates] == [True] * len(results[2].candidates)


def test_impossible_budget_names_the_smallest_reachable_plan(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    sizes = [(memfit.estimate(model, p).weight_bytes, p.recipe) for p in candidate_plans()]
    smallest_bytes, smallest = min(sizes, key=lambda size: size[0])  # ties: the first in search order
    with pytest.raises(BudgetError, match=f"below the smallest reachable plan: '{smallest}' holds") as info:
        _search(model, tokenizer, "1KB", measure_speed=False)
    assert f"raise the budget to at least {format_bytes(smallest_bytes)}" in str(info.value)


def _structure(plan: memfit.Plan) -> list[str]:
    return [s.token for s in plan.strategies if s.phase is Phase.STRUCTURE]


def test_a_budget_only_pruning_meets_gets_a_pruned_plan(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    plans = candidate_plans()
    unpruned = min(memfit.estimate(model, p).weight_bytes for p in plans if not _structure(p))
    pruned = min(memfit.estimate(model, p).weight_bytes for p in plans if _structure(p))
    budget = (unpruned + pruned) // 2  # below every plan without pruning or factors
    result = _search(model, tokenizer, budget, measure_speed=False)
    assert _structure(result.best.plan)
    assert memfit.weight_bytes(result.model) == result.best.metrics.weight_bytes <= budget
    evaluated = [c for c in result.candidates if c.metrics is not None]
    assert len(evaluated) >= 3 and all(_structure(c.plan) for c in evaluated)
    for c in evaluated:
        assert c.metrics.weight_bytes == c.predicted_weight_bytes
    assert result.best.metrics.perplexity == min(c.metrics.perplexity for c in evaluated)


@SHARED
def test_pruning_is_skipped_where_the_plan_without_it_fits(optimized):
    result = optimized[0]
    by_recipe = {c.plan.recipe: c for c in result.candidates}
    assert not _structure(result.best.plan)
    skipped = by_recipe["prune-50-sparsegpt,int8"]
    assert skipped.fits and skipped.metrics is None
    assert skipped.skipped == "'int8' fits without prune-50-sparsegpt"
    assert by_recipe["int8"].metrics is not None
    for c in result.candidates:
        assert (c.skipped is not None) == (c.fits and bool(_structure(c.plan)))
    assert "plans with pruning or low-rank factors were skipped" in render_markdown(result)


def _candidate(recipe: str, ppl: float, decode: float, fits: bool = True) -> Candidate:
    metrics = Metrics(ppl, 1024, 100, 0, 1.0, decode)
    return Candidate(memfit.Plan.parse(recipe), 100, fits, metrics if fits else None)


def test_choice_is_lowest_perplexity_then_fastest_decode():
    baseline = Metrics(10.0, 1024, 400, 0, 1.0, 1.0)
    candidates = [_candidate("int8", 10.5, 5.0), _candidate("int8,bf16", 10.5, 9.0), _candidate("int4-g32", 12, 20),
                  _candidate("none", 10.0, 1.0, fits=False)]
    assert _choose(candidates, baseline, None).plan.recipe == "int8,bf16"
    assert _choose(candidates, baseline, 0.06).plan.recipe == "int8,bf16"


def test_quality_limit_that_nothing_meets_is_explained():
    baseline = Metrics(10.0, 1024, 400, 0, 1.0, 1.0)
    candidates = [_candidate("int8", 12.0, 5.0), _candidate("int4-g32", 13.0, 9.0)]
    with pytest.raises(BudgetError, match=r"within \+10%: the best, 'int8', costs \+20.0%; raise the budget"):
        _choose(candidates, baseline, 0.10)


def test_report_lists_every_candidate_and_marks_the_choice(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    result = _search(model, tokenizer, "30%")
    markdown = render_markdown(result)
    for candidate in result.candidates:
        assert f"| {candidate.plan.recipe}" in markdown
    assert f"| {result.best.plan.recipe} * |" in markdown
    files = write_reports(result)
    assert files["report.html"].startswith("<!doctype html>") and "data:image/png;base64," in files["report.html"]
    assert "data:image/png;base64," in files["report.md"]
