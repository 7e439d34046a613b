""""Then distill" plans: a plan's student trained from the unchanged model for a few steps.

What distillation wins back cannot be predicted from scores measured on the undistilled model, so
the planner distills a few plans for real (`Distillation.per_kind` of each kind, the best
predicted first) and they compete with the undistilled plans on measured perplexity:

- **prune or drop, then distill** (`Recovery.WEIGHTS`: the plan has pruned, dropped or factored
  float weights): the plan's structural strategies are applied, every float weight of the student
  trains against the teacher, then the rest of the plan (quantization, casts) is applied to the
  trained weights, calibrated on them (Minitron's order: prune, distill, quantize). Its bytes are
  the plan's.
- **quantize, then distill the adapters** (`Recovery.ADAPTERS`: the plan packs its weights and no
  float structure is left to train): the whole plan is applied, and rank-8 LoRA adapters beside the
  frozen packed weights train (`recovery_student`). The adapters' bytes count against the budget.

The teacher is the model the search started from, frozen; the loss is `memfit.distill`'s
(forward KL on the chunked logits, the teacher's and the student's never held whole).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from memfit.evaluate import evaluate
from memfit.plan import Plan, apply
from memfit.strategies.base import Phase, Recovery
from memfit.workload import Context, ProgressFn


@dataclasses.dataclass(frozen=True)
class Distillation:
    """How the planner distills its "then distill" plans.

    Args:
        steps: optimizer steps of each distillation.
        batch: sequences per step.
        seq: tokens per sequence.
        data: training text (a file), or None for the built-in calibration text.
        per_kind: plans distilled of each kind (prune or drop, then distill; quantize, then distill
            the adapters), the best predicted first.
        lr: learning rate (None: `memfit.train`'s default, higher for adapters).
        loss: ``"kl"``, ``"reverse-kl"`` or ``"jsd"`` (`memfit.train.distill.Divergence`).
    """

    steps: int
    batch: int = 8
    seq: int = 256
    data: str | None = None
    per_kind: int = 1
    lr: float | None = None
    loss: str = "kl"

    def __post_init__(self) -> None:
        from memfit.train import loop

        loop.check_sizes(self.steps, self.batch, self.seq, 0)
        if self.per_kind < 1:
            raise ValueError(f"per_kind must be at least 1, got {self.per_kind}")


def recovery_kind(plan: Plan) -> Recovery | None:
    """How distillation would recover ``plan``'s loss: `Recovery.WEIGHTS` when a structural strategy
    leaves float weights that train (quantization, if any, follows the training), else
    `Recovery.ADAPTERS` when a strategy packs frozen weights, else None (nothing to recover)."""
    kinds = {type(s).recovers() for s in plan.strategies}
    if any(s.phase is Phase.STRUCTURE and type(s).recovers() is Recovery.WEIGHTS for s in plan.strategies):
        return Recovery.WEIGHTS
    return Recovery.ADAPTERS if Recovery.ADAPTERS in kinds else None


def student_plan(plan: Plan) -> Plan:
    """The plan a distilled student of ``plan`` holds: the plan itself, with `RECOVERY_LORA`
    adapters added for the adapters kind."""
    from memfit.train.distill import RECOVERY_LORA

    if recovery_kind(plan) is not Recovery.ADAPTERS or any(type(s).name == "lora" for s in plan.strategies):
        return plan
    lora = Plan.parse(RECOVERY_LORA).strategies
    return dataclasses.replace(plan, strategies=plan.strategies + lora).validate()


def distilled(model: nn.Module, tokenizer, plan: Plan, settings: Distillation, calibration, memo: dict,
              evaluate_kw: dict, progress: ProgressFn | None) -> tuple[nn.Module, Plan, dict, list[float]]:
    """``plan``'s student distilled from ``model`` (left unchanged) and evaluated.

    Returns:
        ``(the student, the plan it holds, `Metrics.to_dict`, the distillation's per-step losses)``.

    Raises:
        RecipeError: ``plan`` has nothing distillation recovers.
    """
    from memfit.errors import RecipeError
    from memfit.planner.workers import applied_copy, stage
    from memfit.train import distributed, loop
    from memfit.train.distill import RECOVERY_LORA, DistillConfig, Distiller, Divergence

    kind = recovery_kind(plan)
    if kind is None:
        raise RecipeError(f"{plan.recipe!r} costs nothing distillation wins back", "distill a pruned or quantized plan")
    label = f"{plan.recipe}: distilling"
    if kind is Recovery.WEIGHTS:  # structure, then distill, then the rest on the trained weights
        first = [s for s in plan.strategies if s.phase is Phase.STRUCTURE]
        rest = tuple(s for s in plan.strategies if s.phase is not Phase.STRUCTURE)
        student, _ = applied_copy(model, dataclasses.replace(plan, strategies=tuple(first)), stage(progress, label),
                                  calibration, memo)
        recipe = "none"
    else:
        student, _ = applied_copy(model, plan, stage(progress, label), calibration, memo)
        rest, recipe = (), ("none" if student_plan(plan) == plan else RECOVERY_LORA)
    config = DistillConfig(Divergence.parse(settings.loss))
    step = (lambda info: progress(label, info.step, info.steps)) if progress else None
    try:
        result = loop.run(student, tokenizer, None, data=settings.data, steps=settings.steps, batch=settings.batch,
                          seq=settings.seq, recipe=recipe, lr=settings.lr, budget=None, seed=0, out=None,
                          resume=False, save_every=0, progress=step, work_progress=None,
                          objective=lambda trained, _tokenizer, world: Distiller(trained, model, config))
    finally:
        distributed.leave()
    student.eval()
    student.requires_grad_(False)
    if rest:  # calibrated on the trained weights: nothing measured on the undistilled model is reused
        apply(student, dataclasses.replace(plan, strategies=rest), Context(calibration=calibration, memo={}))
    held = dataclasses.replace(plan, strategies=student.memfit_plan.strategies)
    metrics = evaluate(student, tokenizer, **evaluate_kw, kv_cache=plan.settings.kv_cache,
                       progress=stage(progress, f"{plan.recipe}: distilled"))
    return student, held, metrics.to_dict(), result.losses
