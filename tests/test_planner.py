import json

import pytest

import memfit
from memfit.data import calibration_windows
from memfit.errors import BudgetError
from memfit.evaluate import Metrics
from memfit.planner.report import render_markdown, write_reports
from memfit.planner.search import Candidate, Objective, _choose, _rank_key
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
    # generation adds prune-heads-25 (10 plans more) and x {fp cache, kv-int8, kv-int4}
    generate = [p.recipe for p in candidate_plans(memfit.Workload(mode=memfit.Mode.GENERATE))]
    assert len(generate) == len(set(generate)) == 150
    assert "kv-int8" in generate and "prune-heads-25,int8,kv-int4" in generate
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


def test_a_larger_budget_never_predicts_a_worse_plan(make_tiny):
    model, tokenizer = make_tiny("tiny-qwen2")
    budgets = ("25%", "40%", "100%")
    results = [_search(model, tokenizer, b, measure_speed=False) for b in budgets]
    best = [min(c.predicted_divergence for c in r.candidates if c.predicted_divergence is not None) for r in results]
    assert best[0] >= best[1] >= best[2] == 0.0
    assert [c.fits for c in results[2].candidates] == [True] * len(results[2].candidates)
    assert results[2].candidates[0].plan.recipe == "none" and results[2].candidates[0].metrics is not None


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
        if c.fits and _structure(c.plan):
            assert " fits without " in c.skipped
        elif c.skipped is not None:
            assert c.fits and "predicted were evaluated" in c.skipped
    assert "plans with pruning or low-rank factors were skipped" in render_markdown(result)


@SHARED
def test_only_the_best_predicted_plans_are_evaluated(optimized):
    result = optimized[0]
    scored = [c for c in result.candidates if c.predicted_divergence is not None]
    assert all(c.fits and c.skipped is None or "ranks" in c.skipped for c in scored)
    ranked = sorted(scored, key=lambda c: (c.predicted_divergence, c.predicted_weight_bytes))
    assert len(ranked) > 4
    # the best 3 predicted, and the best predicted with a calibrated format (its prediction is too high)
    calibrated = next(c for c in ranked if c.plan.needs_calibration and "sparsegpt" not in c.plan.recipe
                      and "act" not in c.plan.recipe)
    assert [c.metrics is not None for c in ranked] == [c in ranked[:3] or c is calibrated for c in ranked]
    by_recipe = {c.plan.recipe: c.predicted_divergence for c in scored}
    assert 0 < by_recipe["int8"] < by_recipe["int4-g32"] < by_recipe["int4-g64"]
    assert by_recipe["int8,bf16"] > by_recipe["int8"]  # the cast's own divergence is added


def test_a_quality_limit_evaluates_past_the_best_predicted_until_one_meets_it(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    loose = _search(model, tokenizer, "30%", measure_speed=False, evaluations=1)
    assert sum(c.metrics is not None for c in loose.candidates) == 2  # and the best calibrated plan
    ranked = [c for c in loose.candidates if c.predicted_divergence is not None]
    evaluated = []
    progress = lambda description, done, total: evaluated.append(done) if description == "candidates" else None
    # a limit no plan meets (perplexity 1% of the original's): every ranked plan is evaluated, then refused
    with pytest.raises(BudgetError, match=r"no plan within budget keeps perplexity within"):
        _search(model, tokenizer, "30%", measure_speed=False, evaluations=1, max_quality_loss=-0.99, progress=progress)
    assert evaluated == list(range(1, len(ranked) + 1))


def _candidate(recipe: str, ppl: float, decode: float, fits: bool = True) -> Candidate:
    metrics = Metrics(ppl, 1024, 100, 0, 1.0, decode)
    return Candidate(memfit.Plan.parse(recipe), 100, fits, metrics if fits else None)


def test_choice_is_lowest_perplexity_then_fastest_decode():
    baseline = Metrics(10.0, 1024, 400, 0, 1.0, 1.0)
    candidates = [_candidate("int8", 10.5, 5.0), _candidate("int8,bf16", 10.5, 9.0), _candidate("int4-g32", 12, 20),
                  _candidate("none", 10.0, 1.0, fits=False)]
    assert _choose(candidates, baseline, None).plan.recipe == "int8,bf16"
    assert _choose(candidates, baseline, 0.06).plan.recipe == "int8,bf16"


def test_objectives_choose_the_fastest_or_the_most_tokens_per_perplexity_within_the_limit():
    baseline = Metrics(10.0, 1024, 400, 0, 1.0, 1.0)
    candidates = [_candidate("int8", 10.5, 5.0), _candidate("int8,bf16", 10.6, 9.0), _candidate("int4-g32", 12, 20),
                  _candidate("int4-g64", 13, 24)]
    assert _choose(candidates, baseline, None, Objective.SPEED).plan.recipe == "int4-g64"
    assert _choose(candidates, baseline, 0.25, Objective.SPEED).plan.recipe == "int4-g32"  # 13 is +30%
    assert _choose(candidates, baseline, 0.06, Objective.SPEED).plan.recipe == "int8,bf16"
    # perplexity per token/s: 2.1, 1.18, 0.6, 0.54
    assert _choose(candidates, baseline, None, Objective.BALANCED).plan.recipe == "int4-g64"
    assert _choose(candidates, baseline, 0.25, Objective.BALANCED).plan.recipe == "int4-g32"


def test_the_speed_objective_evaluates_the_smallest_plans_predicted_within_the_limit_first():
    plans = [("int8", 300, 0.001), ("int4-g32", 200, 0.2), ("int4-g64", 150, 0.3), ("prune-mlp-25,int4-g64", 100, 0.6)]
    candidates = [Candidate(memfit.Plan.parse(r), size, True, predicted_divergence=kl) for r, size, kl in plans]
    order = lambda objective, limit: [c.plan.recipe for c in sorted(candidates, key=_rank_key(objective, limit))]
    assert order(Objective.SPEED, None) == ["prune-mlp-25,int4-g64", "int4-g64", "int4-g32", "int8"]
    # exp(0.3) - 1 = +35% is over a +30% limit, exp(0.2) - 1 = +22% within it
    assert order(Objective.SPEED, 0.30) == ["int4-g32", "int8", "prune-mlp-25,int4-g64", "int4-g64"]
    assert order(Objective.QUALITY, None) == ["int8", "int4-g32", "int4-g64", "prune-mlp-25,int4-g64"]
    # bytes x exp(divergence): 300.3, 244.3, 202.5, 182.2
    assert order(Objective.BALANCED, None) == ["prune-mlp-25,int4-g64", "int4-g64", "int4-g32", "int8"]


def test_a_speed_search_returns_the_fastest_plan_it_evaluated(make_tiny, capsys):
    model, tokenizer = make_tiny("tiny-llama")
    result = _search(model, tokenizer, "30%", objective="speed")
    evaluated = [c for c in result.candidates if c.metrics is not None and c.fits]
    assert result.objective is Objective.SPEED and len(evaluated) >= 3
    assert result.best.metrics.decode_tokens_per_s == max(c.metrics.decode_tokens_per_s for c in evaluated)
    smallest = min(c.predicted_weight_bytes for c in result.candidates if c.predicted_divergence is not None)
    assert any(c.predicted_weight_bytes == smallest for c in evaluated)
    assert "Objective: the fastest decode." in render_markdown(result)
    with pytest.raises(ValueError, match="objective 'speed' needs a budget"):
        _search(model, tokenizer, None, max_quality_loss=0.1, objective="speed")
    from memfit.cli.main import main

    assert main(["optimize", "--model", "tiny-llama", "--max-ppl-increase", "5", "--objective", "balanced",
                 "--out", "unused"]) == 2
    assert capsys.readouterr().err.count("--objective balanced needs --budget") == 1


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


def test_a_workload_budget_fits_the_tracked_peak_of_that_workload(make_tiny):
    from memfit.profile import profile

    model, tokenizer = make_tiny("tiny-llama")
    work = memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=2, seq_len=192, new_tokens=64)
    peaks = {r: memfit.estimate(model, r, work).peak_bytes for r in ("none", "int8", "int4-g32")}
    weights = {r: memfit.estimate(model, r).weight_bytes for r in peaks}
    # a budget int8's weights fit but its generation (weights + KV cache + activations) does not
    budget = (peaks["int8"] + peaks["int4-g32"]) // 2
    assert weights["int8"] < budget < peaks["int8"]
    result = _search(model, tokenizer, budget, workload=work, measure_speed=False)
    by_recipe = {c.plan.recipe: c for c in result.candidates}
    assert by_recipe["int8"].predicted_weight_bytes <= budget and not by_recipe["int8"].fits
    assert result.best.predicted_peak_bytes <= budget
    tracked = profile(result.model, work, result.best.plan.run)
    assert tracked.peak_bytes == result.best.predicted_peak_bytes <= budget
    assert "for generate at batch 2, 192 tokens + 64 new" in render_markdown(result)


def test_a_quantized_kv_cache_is_chosen_where_the_workload_fits_only_with_it(make_tiny, tmp_path, capsys):
    from memfit.cli.main import main
    from memfit.evaluate import evaluate
    from memfit.profile import profile
    from memfit.runtime.kvcache import KVFormat

    model, tokenizer = make_tiny("tiny-llama")
    work = memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=2, seq_len=192, new_tokens=64)
    recipes = ("int8", "int4-g32", "int8,kv-int8", "int8,kv-int4")
    plans = [memfit.Plan.parse(r).validate() for r in recipes]
    peaks = {r: memfit.estimate(model, r, work).peak_bytes for r in recipes}
    budget = peaks["int8,kv-int8"]  # the cache in int8 is what brings int8 weights within it
    assert peaks["int8,kv-int4"] < budget < min(peaks["int8"], peaks["int4-g32"])
    result = _search(model, tokenizer, budget, workload=work, plans=plans, measure_speed=False)
    by_recipe = {c.plan.recipe: c for c in result.candidates}
    assert not by_recipe["int8"].fits and not by_recipe["int4-g32"].fits
    # predicted from the runtime's logits over the stored cache: 4 bits lose more than 8
    assert 0 < by_recipe["int8,kv-int8"].predicted_divergence < by_recipe["int8,kv-int4"].predicted_divergence
    best = result.best
    assert best.plan.settings.kv_cache in (KVFormat.INT8, KVFormat.INT4)
    assert profile(result.model, work, best.plan.run).peak_bytes == best.predicted_peak_bytes <= budget
    # its perplexity is scored through the quantized cache, not the model's forward without one
    kw = dict(num_tokens=TOKENS, measure_speed=False)
    assert best.metrics.perplexity == evaluate(result.model, tokenizer, kv_cache=best.plan.settings.kv_cache,
                                               **kw).perplexity
    assert best.metrics.perplexity != evaluate(result.model, tokenizer, **kw).perplexity
    # saved, the model keeps the format: memfit eval (and generate) use it unless told otherwise
    memfit.save(result.model, tokenizer, tmp_path / "out")
    for extra, shown in (([], best.plan.settings.kv_cache.token), (["--kv-cache", "none"], None)):
        assert main(["eval", "--model", str(tmp_path / "out"), "--tokens", str(TOKENS), "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["kv_cache"] == shown


def test_a_workload_budget_below_every_plan_names_the_smallest_peak(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    work = memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=8, seq_len=1024, new_tokens=128)
    with pytest.raises(BudgetError, match=r"smallest reachable plan for generate at batch 8, seq 1024: '.*' "
                                          r"peaks at .*; raise the budget to at least .*or shorten the workload"):
        _search(model, tokenizer, "100%", workload=work, measure_speed=False)


def test_without_a_budget_the_smallest_plan_within_the_limit_is_chosen(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    loose = _search(model, tokenizer, None, max_quality_loss=10.0, measure_speed=False)  # +1000%: anything
    sizes = [c.predicted_weight_bytes for c in loose.candidates if c.predicted_divergence is not None]
    assert loose.budget_bytes is None and len(sizes) == len(loose.candidates)  # no budget: every plan is scored
    assert loose.best.predicted_weight_bytes == min(sizes)
    assert [c for c in loose.candidates if c.metrics is not None] == [loose.best]  # the first evaluated is within
    assert "No budget: the smallest plan within +1000% perplexity." in render_markdown(loose)
    # a limit no plan meets: each plan evaluated is predicted to lose less than every one before it
    order = []
    progress = lambda description, done, total: order.append(done) if description == "candidates" else None
    with pytest.raises(BudgetError, match=r"keeps perplexity within -99%"):
        _search(model, tokenizer, None, max_quality_loss=-0.99, measure_speed=False, progress=progress)
    assert 1 <= len(order) < len(sizes)


def test_optimize_without_budget_or_limit_is_refused(capsys, tmp_path):
    from memfit.cli.main import main

    assert main(["optimize", "--model", "tiny-llama", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --budget, --max-ppl-increase, or both" in err[0]
    assert not (tmp_path / "out").exists()


# -- "then distill" plans -----------------------------------------------------------------------------------------
DISTILL = dict(steps=2, batch=2, seq=32)


def test_a_pruned_student_trains_before_it_is_quantized_and_a_quantized_one_trains_adapters(make_tiny):
    from memfit.evaluate import evaluate
    from memfit.planner.distill import Distillation, distilled
    from memfit.planner.workers import applied_copy

    model, tokenizer = make_tiny("tiny-llama")
    calibration = calibration_windows(tokenizer, windows=4, window=256)
    kw = dict(num_tokens=TOKENS, measure_speed=False)
    settings = Distillation(**DISTILL, lr=1e-2)
    for recipe, held in (("prune-mlp-25,int8", "prune-mlp-25,int8"), ("int8", "int8,lora-8")):
        plan = memfit.Plan.parse(recipe).validate()
        student, plan_held, metrics, losses = distilled(model, tokenizer, plan, settings, calibration, {}, kw, None)
        assert plan_held.recipe == student.memfit_plan.recipe == held and len(losses) == 2
        assert metrics["weight_bytes"] == memfit.weight_bytes(student) == memfit.estimate(model, plan_held).weight_bytes
        undistilled = evaluate(applied_copy(model, plan, None, calibration, {})[0], tokenizer, **kw).perplexity
        assert metrics["perplexity"] != undistilled  # the student's weights (or adapters) moved
    assert metrics["weight_bytes"] > memfit.estimate(model, "int8").weight_bytes  # the adapters count


def test_then_distill_plans_compete_with_the_others_within_the_budget(make_tiny):
    from memfit.planner.distill import Distillation, recovery_kind
    from memfit.strategies.base import Recovery

    model, tokenizer = make_tiny("tiny-llama")
    result = _search(model, tokenizer, "30%", measure_speed=False, distill=Distillation(**DISTILL))
    students = [c for c in result.candidates if c.distill_steps is not None]
    assert {recovery_kind(c.plan) for c in students} == {Recovery.WEIGHTS, Recovery.ADAPTERS}
    # the adapters' student is the mixed plan sized to leave room for them (the one sized to the budget has none)
    adapted = next(c for c in students if recovery_kind(c.plan) is Recovery.ADAPTERS)
    assert adapted.plan.recipe.startswith("mixed-bits-") and adapted.plan.recipe.endswith(",lora-8")
    for c in students:
        assert c.distill_steps == 2 and c.metrics.weight_bytes == c.predicted_weight_bytes <= result.budget_bytes
    structural = [c for c in result.candidates
                  if recovery_kind(c.plan) is Recovery.WEIGHTS and c.fits and c.distill_steps is None]
    assert structural and all(c.predicted_divergence is not None for c in structural)  # scored, not skipped
    evaluated = [c for c in result.candidates if c.metrics is not None and c.fits]
    assert result.best.metrics.perplexity == min(c.metrics.perplexity for c in evaluated)
    assert f"{students[0].plan.recipe}, distilled 2 steps" in render_markdown(result)
    assert memfit.weight_bytes(result.model) == result.best.metrics.weight_bytes


def test_distilling_without_a_budget_is_refused(capsys, tmp_path):
    from memfit.cli.main import main

    code = main(["optimize", "--model", "tiny-llama", "--max-ppl-increase", "5", "--distill-steps", "2",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--distill-steps weighs distilled students within a budget" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
