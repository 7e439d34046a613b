"""`optimize()`: find the plan that fits a memory budget with the least loss of quality.

It enumerates `candidate_plans` and predicts each one's memory with `estimate` (meta and fake
tensors, nothing computed): the weights, or with a workload the whole run's peak (weights, KV
cache, activations). It sets aside those over budget, predicts the quality of the rest from scores
measured once (`memfit.planner.scores.PlanScorer`: per-block divergences, summed), applies and
`evaluate`s the few best predicted on a copy of the model, and returns the lowest measured
perplexity within budget (and within the quality limit, if one is given), ties broken by decode
speed; or, by `Objective`, the fastest decode or the most tokens/s per unit of perplexity.
Predictions are checked against the measured bytes of every evaluated candidate.

Structural compression (pruning, low-rank factors: `Phase.STRUCTURE`) always costs quality on top
of what the rest of its plan costs, so a plan with it is evaluated only where the same plan without
it does not fit: it is there to reach budgets that quantization alone cannot. This keeps the number
of evaluations (each a calibrated run) near what it is without those options.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math

import torch
from torch import nn

from memfit.errors import BudgetError
from memfit.estimate import estimate
from memfit.evaluate import DEFAULT_TOKENS, Metrics, evaluate
from memfit.memory.report import weight_bytes
from memfit.plan import Plan
from memfit.planner.distill import Distillation, distilled, recovery_kind, student_plan
from memfit.planner.scores import PlanScorer
from memfit.planner.space import budget_plans, candidate_plans
from memfit.planner.workers import Workers, applied_copy, evaluate_plan, open_study, run_workers, stage, study_config
from memfit.runtime import runs_on_runtime
from memfit.strategies.base import Phase, Recovery
from memfit.units import format_bytes, parse_budget
from memfit.workload import ProgressFn, Workload

log = logging.getLogger(__name__)

EVALUATIONS = 3
"""Plans evaluated for real by default: the best predicted (more while none meets a quality limit)."""


class Objective(enum.Enum):
    """What the chosen plan is best at, among those within the budget and the quality limit.

    - ``quality``: the lowest perplexity (ties: the faster decode).
    - ``speed``: the fastest decode. Plans are ranked for evaluation by predicted weight bytes
      (decode reads every weight once per token), those predicted within the quality limit first.
    - ``balanced``: the most decode tokens/s per unit of perplexity (the least perplexity x seconds
      per token), ranked by predicted weight bytes x exp(predicted divergence).
    """

    QUALITY = "quality"
    SPEED = "speed"
    BALANCED = "balanced"


@dataclasses.dataclass
class Candidate:
    """One plan the planner considered.

    Args:
        plan: the plan.
        predicted_weight_bytes: weight bytes `estimate` predicted.
        fits: predicted (and, once evaluated, measured) bytes within the budget.
        metrics: measured by `evaluate`; None if the plan was not evaluated (it did not fit, or
            ``skipped`` says why).
        notes: what the strategies reported doing.
        skipped: why a plan that fits was not evaluated, else None.
        predicted_peak_bytes: with a workload budget, the workload's predicted peak (checked on
            the applied model once evaluated); else None.
        predicted_divergence: the predicted KL divergence from the model (nats per token) of a
            plan that fits; None for one that does not, and for a distilled student.
        distill_steps: for a "then distill" candidate (`memfit.planner.distill`), the steps its
            student was distilled for; None for the plan as applied.
    """

    plan: Plan
    predicted_weight_bytes: int
    fits: bool
    metrics: Metrics | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    predicted_peak_bytes: int | None = None
    predicted_divergence: float | None = None
    distill_steps: int | None = None

    @property
    def label(self) -> str:
        """The plan's recipe, and "then distilled" for a distilled student."""
        steps = self.distill_steps
        return self.plan.recipe if steps is None else f"{self.plan.recipe}, distilled {steps} steps"

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.recipe,
            "distill_steps": self.distill_steps,
            "predicted_weight_bytes": self.predicted_weight_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_divergence": self.predicted_divergence,
            "fits": self.fits,
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "skipped": self.skipped,
        }


@dataclasses.dataclass
class OptimizeResult:
    """What `optimize` found.

    Args:
        budget_bytes: the budget in bytes (None: the smallest plan within ``max_quality_loss``).
        baseline: metrics of the model as given.
        best: the chosen candidate.
        candidates: every candidate, in search order.
        model: the model with the best plan applied (a copy; the input model is unchanged).
        max_quality_loss: the quality limit used (fraction of perplexity), if any.
        workload: what the budget covers besides the weights (None: the weights only).
        objective: what the chosen plan is best at.
        study: with workers, ``{"storage", "name"}`` of the study that holds the evaluations.
    """

    budget_bytes: int | None
    baseline: Metrics
    best: Candidate
    candidates: list[Candidate]
    model: nn.Module
    max_quality_loss: float | None = None
    workload: Workload | None = None
    study: dict | None = None
    objective: Objective = Objective.QUALITY


def optimize(
    model: nn.Module,
    tokenizer,
    budget: int | str | None,
    *,
    max_quality_loss: float | None = None,
    workload: Workload | None = None,
    plans: list[Plan] | None = None,
    text: str | None = None,
    num_tokens: int = DEFAULT_TOKENS,
    measure_speed: bool = True,
    calibration: torch.Tensor | None = None,
    evaluations: int = EVALUATIONS,
    progress: ProgressFn | None = None,
    workers: Workers | None = None,
    objective: Objective | str = Objective.QUALITY,
    distill: Distillation | None = None,
) -> OptimizeResult:
    """Search for the plan with the lowest perplexity that fits ``budget``.

    Args:
        model: the model to fit (left unchanged; candidates are applied to copies).
        tokenizer: its tokenizer.
        budget: bytes, or a string such as ``"60MB"``, ``"1.5GiB"`` or ``"25%"`` (of the model's
            current weight bytes); or None with ``max_quality_loss``: the smallest plan within it.
        max_quality_loss: the largest perplexity increase accepted, as a fraction (0.05 = +5%).
            Without a budget, plans are evaluated from the smallest up (skipping those predicted to
            lose at least as much as one already over the limit) and the first within it is chosen.
        workload: what the model will run (generate, batch 1, 2,048 tokens): the budget then
            covers the workload's whole predicted peak (weights, KV cache, activations), not only
            the weights. None: the weights only.
        plans: candidates to consider instead of `candidate_plans(workload)`.
        text: evaluation text (the built-in evaluation part if None).
        num_tokens: evaluation tokens per candidate.
        measure_speed: also time prefill and decode of each candidate (ties go to faster decode).
        calibration: token windows for calibrated plans (GPTQ) and for predicting quality; by
            default 32 windows of 512 tokens of the built-in calibration text.
        evaluations: plans evaluated for real, the best predicted first; with a quality limit,
            more until one meets it. The best predicted plan with a calibrated format (GPTQ, AWQ:
            predicted from rounding to nearest, too high) is evaluated too.
        progress: ``progress(description, done, total)`` callback.
        workers: evaluate the chosen plans in worker processes sharing one Optuna study (`Workers`)
            instead of here, one after another. The search itself (predictions, choices) is the
            same; a killed search resumes from its study.
        objective: ``"quality"`` (default), ``"speed"`` or ``"balanced"`` (`Objective`): what the
            chosen plan is best at, within the budget and ``max_quality_loss``. Needs a budget and
            ``measure_speed`` unless it is quality.
        distill: also distill the best predicted plans of each kind ("prune or drop, then
            distill", "quantize, then distill the adapters": `memfit.planner.distill`) from the
            model, here, after the other evaluations; the students compete on measured perplexity
            and bytes like any plan. Needs a budget. Structural plans are then scored even where
            the same plan without them fits.

    Returns:
        `OptimizeResult` with the best candidate, all candidates and the optimized model.

    Raises:
        BudgetError: no candidate fits (the message names the smallest reachable size), or none
            within budget meets ``max_quality_loss``.

    Example:
        >>> result = memfit.optimize(model, tokenizer, "30%")
        >>> result.best.plan.recipe, result.best.metrics.perplexity
    """
    if evaluations < 1:
        raise ValueError(f"evaluations must be at least 1, got {evaluations}")
    if budget is None and max_quality_loss is None:
        raise ValueError("optimize needs a budget, a quality limit (max_quality_loss), or both")
    objective = Objective(objective)
    if distill is not None and budget is None:
        raise ValueError("distill needs a budget (without one, the smallest plan within the quality limit is chosen)")
    if objective is not Objective.QUALITY and (budget is None or not measure_speed):
        raise ValueError(f"objective {objective.value!r} needs a budget and measure_speed (without a budget, the "
                         "smallest plan within the quality limit is chosen)")
    original_bytes = weight_bytes(model)
    budget_bytes = None if budget is None else (
        parse_budget(budget, original_bytes) if isinstance(budget, str) else int(budget))
    if plans is None:
        plans = candidate_plans(workload)
        if not runs_on_runtime(model):  # a quantized KV cache is memfit runtime's
            plans = [p for p in plans if p.settings.kv_cache is None]
        if budget_bytes is not None:  # a workload's other bytes (KV cache, activations) leave the weights the rest
            overhead = estimate(model, Plan(), workload).peak_bytes - original_bytes if workload else 0
            plans += budget_plans(model, budget_bytes - overhead, workload)
            if distill is not None:  # sized to leave room for the adapters its distilled student adds
                adapters = _adapter_bytes(model)
                recipes = {p.recipe for p in plans}
                plans += [p for p in budget_plans(model, budget_bytes - overhead - adapters, workload)
                          if p.recipe not in recipes]
    candidates = [_predicted(model, plan, original_bytes, budget_bytes, workload) for plan in plans]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise _over_budget(model, candidates, budget_bytes, original_bytes, workload)

    if budget_bytes is not None:  # without a budget, structure is what makes plans small
        _skip_needless_structure(fitting, keep_recoverable=distill is not None)
    fitting = [c for c in fitting if c.skipped is None]
    if calibration is None:
        from memfit.data import calibration_windows

        calibration = calibration_windows(tokenizer)
    evaluate_kw = dict(text=text, num_tokens=num_tokens, measure_speed=measure_speed)
    shared = None if workers is None else open_study(
        workers, study_config(workers, text, evaluate_kw, calibration, workload))
    memo: dict = {}
    scorer = PlanScorer(model, calibration, memo, progress)
    for c in fitting:
        c.predicted_divergence = scorer(c.plan)
        resolved = scorer.resolve(c.plan)  # choices made on data, made now from the scores: exact bytes
        if resolved != c.plan:
            refit = _predicted(model, resolved, original_bytes, budget_bytes, workload)
            c.plan, c.predicted_weight_bytes, c.predicted_peak_bytes, c.fits = (
                resolved, refit.predicted_weight_bytes, refit.predicted_peak_bytes, refit.fits)
    fitting = [c for c in fitting if c.fits]
    ranked = sorted(fitting, key=_rank_key(objective, max_quality_loss))
    baseline = evaluate(model, tokenizer, **evaluate_kw, progress=stage(progress, "baseline"))
    limit = None if max_quality_loss is None else baseline.perplexity * (1 + max_quality_loss)

    evaluated: list[Candidate] = []  # in this process, for the progress bar
    planned = 1 if budget_bytes is None else evaluations
    kept: list = []  # [candidate, its applied copy] of the plan chosen so far: the winner is not applied twice

    def run(batch: list[Candidate]) -> None:
        """Evaluate ``batch``: here, one plan after another, or in the workers at once."""
        for c in batch:
            if c.plan.is_empty:
                c.metrics = baseline
        batch = [c for c in batch if not c.plan.is_empty]
        if shared is not None:
            for c, result in zip(batch, run_workers(shared, workers, [c.plan for c in batch], progress), strict=True):
                _record(c, result, budget_bytes, workload)
            return
        for c in batch:
            result, work = evaluate_plan(model, tokenizer, c.plan, workload, calibration, memo, evaluate_kw, progress)
            _record(c, result, budget_bytes, workload)
            if _leader(candidates, baseline, max_quality_loss, objective) is c:
                kept[:] = [c, work]
            del work
            evaluated.append(c)
            if progress:
                progress("candidates", len(evaluated), max(len(evaluated), planned))

    def then_distill() -> None:
        """Distill the best predicted plans of each kind and record the students as candidates."""
        for plan in _to_distill(model, ranked, distill, budget_bytes, workload):
            student, held, metrics, _ = distilled(model, tokenizer, plan, distill, calibration, memo, evaluate_kw,
                                                  progress)
            c = Candidate(held, estimate(model, held).weight_bytes, True, distill_steps=distill.steps)
            peak = None if workload is None else estimate(student, Plan(settings=plan.settings), workload).peak_bytes
            _record(c, {"plan": held.to_dict(), "metrics": metrics, "notes": [], "predicted_peak_bytes": peak},
                    budget_bytes, workload)
            candidates.append(c)
            if _leader(candidates, baseline, max_quality_loss, objective) is c:
                kept[:] = [c, student]
            del student

    def winner(best: Candidate) -> nn.Module:
        """The chosen plan applied: the copy it was evaluated on, or a new one (from workers). Its
        run settings (a KV-cache format) ride on its ``memfit_plan``, so `save` records them."""
        work = kept.pop() if kept and kept[0] is best else applied_copy(model, best.plan, None, calibration, memo)[0]
        work.memfit_plan = dataclasses.replace(work.memfit_plan, settings=best.plan.settings)
        return work

    if budget_bytes is None:
        best = _smallest_within(fitting, limit, max_quality_loss, baseline, lambda c: run([c]))
        return OptimizeResult(None, baseline, best, candidates, winner(best), max_quality_loss, workload,
                              _where(shared), objective)
    # calibrated formats are predicted from rounding to nearest, too high: the best of them is evaluated too
    calibrated = next((c for c in ranked if scorer.upper_bound(c.plan)), None)
    chosen = ranked[:evaluations]
    if calibrated is not None and not any(c is calibrated for c in chosen):
        chosen.append(calibrated)
    run(chosen)
    rest = [c for c in ranked if c.metrics is None]
    width = 1 if workers is None else workers.count  # past the first, more until one meets the limit
    while rest and limit is not None and not any(c.metrics and c.fits and c.metrics.perplexity <= limit
                                                 for c in ranked):
        run(rest[:width])
        rest = rest[width:]
    done = sum(c.metrics is not None for c in ranked)
    for rank, c in enumerate(ranked):
        if c.metrics is None:
            c.skipped = (f"predicted divergence {c.predicted_divergence:.4g} ranks {rank + 1} of "
                         f"{len(ranked)}: the best {done} predicted were evaluated")
    if distill is not None:
        then_distill()

    best = _choose(candidates, baseline, max_quality_loss, objective)
    return OptimizeResult(budget_bytes, baseline, best, candidates, winner(best), max_quality_loss, workload,
                          _where(shared), objective)


def _adapter_bytes(model: nn.Module) -> int:
    """Bytes the distillation's adapters (`student_plan`'s) add to a quantized plan of ``model``."""
    base = Plan.parse("int8").validate()
    return estimate(model, student_plan(base)).weight_bytes - estimate(model, base).weight_bytes


def _to_distill(model: nn.Module, ranked: list[Candidate], distill: Distillation, budget_bytes: int,
                workload: Workload | None) -> list[Plan]:
    """The best predicted `Distillation.per_kind` plans of each recovery kind whose student (with
    its adapters, for the adapters kind) is predicted to fit the budget."""
    chosen: dict[Recovery, list[Plan]] = {}
    for c in ranked:
        kind = recovery_kind(c.plan)
        if kind is None or len(chosen.setdefault(kind, [])) >= distill.per_kind:
            continue
        student = student_plan(c.plan)
        predicted = estimate(model, student, workload)
        if (predicted.weight_bytes if workload is None else predicted.peak_bytes) <= budget_bytes:
            chosen[kind].append(c.plan)
    return [plan for kind in (Recovery.WEIGHTS, Recovery.ADAPTERS) for plan in chosen.get(kind, [])]


def _where(shared) -> dict | None:
    return None if shared is None else {"storage": shared.spec, "name": shared.name}


def _smallest_within(fitting: list[Candidate], limit: float, max_quality_loss: float, baseline: Metrics,
                     run) -> Candidate:
    """The smallest plan whose measured perplexity is within ``limit``: plans are evaluated from the
    smallest predicted bytes up, and one predicted to lose at least as much as a plan already over
    the limit is skipped."""
    size = lambda c: c.predicted_peak_bytes if c.predicted_peak_bytes is not None else c.predicted_weight_bytes
    over: Candidate | None = None  # the evaluated plan over the limit with the least predicted divergence
    for candidate in sorted(fitting, key=lambda c: (size(c), c.predicted_divergence)):
        if over is not None and candidate.predicted_divergence >= over.predicted_divergence:
            candidate.skipped = (f"predicted divergence {candidate.predicted_divergence:.4g}, at least that of "
                                 f"{over.plan.recipe!r}, which was over the limit")
            continue
        run(candidate)
        if candidate.metrics.perplexity <= limit:
            for c in fitting:
                if c.metrics is None and c.skipped is None:
                    c.skipped = f"{candidate.plan.recipe!r}, no larger, is within the limit"
            return candidate
        if over is None or candidate.predicted_divergence < over.predicted_divergence:
            over = candidate
    return _choose(fitting, baseline, max_quality_loss)  # none within: the error names the nearest


def _predicted(model: nn.Module, plan: Plan, original_bytes: int, budget_bytes: int | None,
               workload: Workload | None) -> Candidate:
    """A candidate with its predicted weight bytes (and, for a workload, peak) and whether they fit
    (every plan fits when there is no budget)."""
    predicted = original_bytes if not plan.strategies else estimate(model, plan).weight_bytes
    candidate = Candidate(plan, predicted, _within(predicted, budget_bytes))
    if workload is not None and candidate.fits:  # a peak holds the weights: only those that fit are run
        candidate.predicted_peak_bytes = estimate(model, plan, workload).peak_bytes
        candidate.fits = _within(candidate.predicted_peak_bytes, budget_bytes)
    return candidate


def _within(size: int, budget_bytes: int | None) -> bool:
    return budget_bytes is None or size <= budget_bytes


def _over_budget(model: nn.Module, candidates: list[Candidate], budget_bytes: int, original_bytes: int,
                 workload: Workload | None) -> BudgetError:
    """The error naming the smallest plan: by weight bytes, or by the workload's peak (predicted
    now for the plans whose weights alone were over budget, the lightest first, until a plan's weights
    alone outweigh the smallest peak found)."""
    if workload is None:
        smallest = min(candidates, key=lambda c: c.predicted_weight_bytes)
    else:
        smallest = None
        for c in sorted(candidates, key=lambda c: c.predicted_weight_bytes):
            if smallest is not None and c.predicted_weight_bytes >= smallest.predicted_peak_bytes:
                break  # a peak holds the weights
            if c.predicted_peak_bytes is None:
                c.predicted_peak_bytes = estimate(model, c.plan, workload).peak_bytes
            if smallest is None or c.predicted_peak_bytes < smallest.predicted_peak_bytes:
                smallest = c
    if workload is None:
        return BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the smallest reachable plan: "
            f"{smallest.plan.recipe!r} holds {format_bytes(smallest.predicted_weight_bytes)}",
            f"raise the budget to at least {format_bytes(smallest.predicted_weight_bytes)} "
            f"({100 * smallest.predicted_weight_bytes / original_bytes:.1f}% of the original)",
        )
    return BudgetError(
        f"budget {format_bytes(budget_bytes)} is below the smallest reachable plan for {workload.mode.value} at "
        f"batch {workload.batch_size}, seq {workload.seq_len}: {smallest.plan.recipe!r} peaks at "
        f"{format_bytes(smallest.predicted_peak_bytes)}",
        f"raise the budget to at least {format_bytes(smallest.predicted_peak_bytes)}, or shorten the workload",
    )


def _record(candidate: Candidate, result: dict, budget_bytes: int | None, workload: Workload | None) -> None:
    """Fill in ``candidate`` from its evaluation (`evaluate_plan`) and check its bytes against the prediction."""
    # choices made on data (mixed formats' per-block options) are recorded in the applied plan
    candidate.plan = dataclasses.replace(candidate.plan, strategies=Plan.from_dict(result["plan"]).strategies)
    candidate.metrics = Metrics(**result["metrics"])
    candidate.notes = result["notes"]
    if candidate.metrics.weight_bytes != candidate.predicted_weight_bytes:
        log.warning(
            "%s: predicted %d weight bytes, measured %d",
            candidate.plan.recipe, candidate.predicted_weight_bytes, candidate.metrics.weight_bytes,
        )
    candidate.fits = _within(candidate.metrics.weight_bytes, budget_bytes)
    if workload is not None:  # the applied model's own prediction: choices made on data are settled now
        candidate.predicted_peak_bytes = result["predicted_peak_bytes"]
        candidate.fits = candidate.fits and _within(candidate.predicted_peak_bytes, budget_bytes)


def _skip_needless_structure(fitting: list[Candidate], keep_recoverable: bool = False) -> None:
    """Mark the fitting plans whose plan without its structural strategies also fits; with
    ``keep_recoverable``, not those whose float structure distillation trains (`Recovery.WEIGHTS`)."""
    fits = {(c.plan.strategies, c.plan.settings) for c in fitting}
    for c in fitting:
        if keep_recoverable and recovery_kind(c.plan) is Recovery.WEIGHTS:
            continue
        rest = tuple(s for s in c.plan.strategies if s.phase is not Phase.STRUCTURE)
        if rest != c.plan.strategies and (rest, c.plan.settings) in fits:
            without = Plan(rest, c.plan.workload, c.plan.settings).recipe
            c.skipped = f"{without!r} fits without {', '.join(s.token for s in c.plan.strategies if s not in rest)}"


def _rank_key(objective: Objective, max_quality_loss: float | None):
    """The order plans are evaluated in (the best predicted first) for ``objective``."""
    if objective is Objective.QUALITY:
        return lambda c: (c.predicted_divergence, c.predicted_weight_bytes)
    if objective is Objective.SPEED:  # perplexity grows about as exp(divergence): those predicted within first
        limit = math.inf if max_quality_loss is None else math.log1p(max_quality_loss)
        return lambda c: (c.predicted_divergence > limit, c.predicted_weight_bytes, c.predicted_divergence)
    return lambda c: (c.predicted_weight_bytes * math.exp(c.predicted_divergence), c.predicted_divergence)


def _leader(candidates: list[Candidate], baseline: Metrics, max_quality_loss: float | None,
            objective: Objective = Objective.QUALITY) -> Candidate | None:
    """The evaluated candidate `_choose` would return now, or None if none is eligible yet."""
    limit = None if max_quality_loss is None else baseline.perplexity * (1 + max_quality_loss)
    eligible = [c for c in candidates if c.fits and c.metrics is not None
                and (limit is None or c.metrics.perplexity <= limit)]
    if not eligible:
        return None
    speed = lambda c: c.metrics.decode_tokens_per_s or 0.0
    if objective is Objective.SPEED:
        return min(eligible, key=lambda c: (-speed(c), c.metrics.perplexity))
    if objective is Objective.BALANCED:
        return min(eligible, key=lambda c: (c.metrics.perplexity / max(speed(c), 1e-9), c.metrics.perplexity))
    return min(eligible, key=lambda c: (c.metrics.perplexity, -speed(c)))


def _choose(candidates: list[Candidate], baseline: Metrics, max_quality_loss: float | None,
            objective: Objective = Objective.QUALITY) -> Candidate:
    """The best evaluated candidate by ``objective`` within budget and ``max_quality_loss``.

    Raises:
        BudgetError: none of those evaluated is within the quality limit (names the nearest).
    """
    leader = _leader(candidates, baseline, max_quality_loss, objective)
    if leader is None:
        evaluated = [c for c in candidates if c.fits and c.metrics is not None]
        nearest = min(evaluated, key=lambda c: c.metrics.perplexity)
        increase = 100 * (nearest.metrics.perplexity / baseline.perplexity - 1)
        raise BudgetError(
            f"no plan within budget keeps perplexity within {100 * max_quality_loss:+g}%: the best, "
            f"{nearest.plan.recipe!r}, costs +{increase:.1f}%",
            "raise the budget or the allowed perplexity increase",
        )
    return leader
