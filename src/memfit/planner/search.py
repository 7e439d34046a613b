"""`optimize()`: find the plan that fits a memory budget with the least loss of quality.

Planner v0. It enumerates `candidate_plans`, predicts each one's weight bytes with `estimate`
(meta tensors, nothing computed), sets aside those over budget, applies and `evaluate`s the rest
on a copy of the model, and returns the lowest measured perplexity within budget (and within the
quality limit, if one is given), ties broken by decode speed. Predictions are checked against the
measured bytes of every evaluated candidate.

Structural compression (pruning, low-rank factors: `Phase.STRUCTURE`) always costs quality on top
of what the rest of its plan costs, so a plan with it is evaluated only where the same plan without
it does not fit: it is there to reach budgets that quantization alone cannot. This keeps the number
of evaluations (each a calibrated run) near what it is without those options.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from memfit.errors import BudgetError
from memfit.estimate import estimate
from memfit.evaluate import DEFAULT_TOKENS, Metrics, evaluate
from memfit.memory.report import weight_bytes
from memfit.plan import Plan, apply
from memfit.planner.space import budget_plans, candidate_plans
from memfit.strategies.base import Phase
from memfit.units import format_bytes, parse_budget
from memfit.workload import Context, ProgressFn, Workload

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    """One plan the planner considered.

    Args:
        plan: the plan.
        predicted_weight_bytes: bytes `estimate` predicted.
        fits: predicted (and, once evaluated, measured) weight bytes within the budget.
        metrics: measured by `evaluate`; None if the plan was not evaluated (it did not fit, or
            ``skipped`` says why).
        notes: what the strategies reported doing.
        skipped: why a plan that fits was not evaluated, else None.
    """

    plan: Plan
    predicted_weight_bytes: int
    fits: bool
    metrics: Metrics | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.recipe,
            "predicted_weight_bytes": self.predicted_weight_bytes,
            "fits": self.fits,
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "skipped": self.skipped,
        }


@dataclasses.dataclass
class OptimizeResult:
    """What `optimize` found.

    Args:
        budget_bytes: the budget in bytes.
        baseline: metrics of the model as given.
        best: the chosen candidate.
        candidates: every candidate, in search order.
        model: the model with the best plan applied (a copy; the input model is unchanged).
        max_quality_loss: the quality limit used (fraction of perplexity), if any.
    """

    budget_bytes: int
    baseline: Metrics
    best: Candidate
    candidates: list[Candidate]
    model: nn.Module
    max_quality_loss: float | None = None


def optimize(
    model: nn.Module,
    tokenizer,
    budget: int | str,
    *,
    max_quality_loss: float | None = None,
    workload: Workload | None = None,
    plans: list[Plan] | None = None,
    text: str | None = None,
    num_tokens: int = DEFAULT_TOKENS,
    measure_speed: bool = True,
    calibration: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
) -> OptimizeResult:
    """Search for the plan with the lowest perplexity whose weights fit ``budget``.

    Args:
        model: the model to fit (left unchanged; candidates are applied to copies).
        tokenizer: its tokenizer.
        budget: bytes, or a string such as ``"60MB"``, ``"1.5GiB"`` or ``"25%"`` (of the model's
            current weight bytes).
        max_quality_loss: the largest perplexity increase accepted, as a fraction (0.05 = +5%).
        workload: what the model will run (the candidate space depends on the device).
        plans: candidates to consider instead of `candidate_plans(workload)`.
        text: evaluation text (the built-in evaluation part if None).
        num_tokens: evaluation tokens per candidate.
        measure_speed: also time prefill and decode of each candidate (ties go to faster decode).
        calibration: token windows for calibrated plans (GPTQ); by default 32 windows of 512
            tokens of the built-in calibration text, made only if a fitting plan needs them.
        progress: ``progress(description, done, total)`` callback.

    Returns:
        `OptimizeResult` with the best candidate, all candidates and the optimized model.

    Raises:
        BudgetError: no candidate fits (the message names the smallest reachable size), or none
            within budget meets ``max_quality_loss``.

    Example:
        >>> result = memfit.optimize(model, tokenizer, "30%")
        >>> result.best.plan.recipe, result.best.metrics.perplexity
    """
    original_bytes = weight_bytes(model)
    budget_bytes = parse_budget(budget, original_bytes) if isinstance(budget, str) else int(budget)
    if plans is None:
        plans = candidate_plans(workload) + budget_plans(model, budget_bytes, workload)
    candidates = []
    for plan in plans:
        predicted = original_bytes if not plan.strategies else estimate(model, plan).weight_bytes
        candidates.append(Candidate(plan, predicted, predicted <= budget_bytes))
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.predicted_weight_bytes)
        raise BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the smallest reachable plan: "
            f"{smallest.plan.recipe!r} holds {format_bytes(smallest.predicted_weight_bytes)}",
            f"raise the budget to at least {format_bytes(smallest.predicted_weight_bytes)} "
            f"({100 * smallest.predicted_weight_bytes / original_bytes:.1f}% of the original)",
        )

    _skip_needless_structure(fitting)
    fitting = [c for c in fitting if c.skipped is None]
    if calibration is None and any(c.plan.needs_calibration for c in fitting):
        from memfit.data import calibration_windows

        calibration = calibration_windows(tokenizer)
    evaluate_kw = dict(text=text, num_tokens=num_tokens, measure_speed=measure_speed)
    baseline = evaluate(model, tokenizer, **evaluate_kw, progress=_stage(progress, "baseline"))
    for i, candidate in enumerate(fitting):
        if not candidate.plan.strategies:
            candidate.metrics = baseline
            continue
        work, ctx = _applied_copy(model, candidate.plan, progress, calibration)
        candidate.notes = ctx.notes
        candidate.metrics = evaluate(work, tokenizer, **evaluate_kw, progress=_stage(progress, candidate.plan.recipe))
        del work
        if candidate.metrics.weight_bytes != candidate.predicted_weight_bytes:
            log.warning(
                "%s: predicted %d weight bytes, measured %d",
                candidate.plan.recipe, candidate.predicted_weight_bytes, candidate.metrics.weight_bytes,
            )
        candidate.fits = candidate.metrics.weight_bytes <= budget_bytes
        if progress:
            progress("candidates", i + 1, len(fitting))

    best = _choose(candidates, baseline, max_quality_loss)
    optimized, _ = _applied_copy(model, best.plan, None, calibration)
    return OptimizeResult(budget_bytes, baseline, best, candidates, optimized, max_quality_loss)


def _skip_needless_structure(fitting: list[Candidate]) -> None:
    """Mark the fitting plans whose plan without its structural strategies also fits."""
    fits = {c.plan.strategies for c in fitting}
    for c in fitting:
        rest = tuple(s for s in c.plan.strategies if s.phase is not Phase.STRUCTURE)
        if rest != c.plan.strategies and rest in fits:
            without = Plan(rest, c.plan.workload).recipe
            c.skipped = f"{without!r} fits without {', '.join(s.token for s in c.plan.strategies if s not in rest)}"


def _choose(candidates: list[Candidate], baseline: Metrics, max_quality_loss: float | None) -> Candidate:
    evaluated = [c for c in candidates if c.fits and c.metrics is not None]
    limit = None if max_quality_loss is None else baseline.perplexity * (1 + max_quality_loss)
    eligible = [c for c in evaluated if limit is None or c.metrics.perplexity <= limit]
    if not eligible:
        nearest = min(evaluated, key=lambda c: c.metrics.perplexity)
        increase = 100 * (nearest.metrics.perplexity / baseline.perplexity - 1)
        raise BudgetError(
            f"no plan within budget keeps perplexity within +{100 * max_quality_loss:g}%: the best, "
            f"{nearest.plan.recipe!r}, costs +{increase:.1f}%",
            "raise the budget or the allowed perplexity increase",
        )
    return min(eligible, key=lambda c: (c.metrics.perplexity, -(c.metrics.decode_tokens_per_s or 0.0)))


def _applied_copy(
    model: nn.Module, plan: Plan, progress: ProgressFn | None, calibration: torch.Tensor | None
) -> tuple[nn.Module, Context]:
    work = copy.deepcopy(model)
    ctx = Context(progress=progress, calibration=calibration)
    apply(work, plan, ctx)
    return work, ctx


def _stage(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda description, done, total: progress(f"{label}: {description}", done, total)
