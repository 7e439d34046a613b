"""The planner's search space: combinations of the registered strategies' option grids.

Each registered class declares its options (`Strategy.space`), and training workloads add the run
settings' (`memfit.settings.settings_space`), which share the runtime phase. A candidate plan
takes at most one option per phase (the empty choice included), so the space grows as the product
of the phases' option counts; combinations that `Plan.validate` rejects are dropped. Strategies
that size themselves to the budget (mixed bit-widths) add one plan each (`budget_plans`).
"""

from __future__ import annotations

import itertools

from memfit.errors import RecipeError
from memfit.plan import Plan
from memfit.settings import RunSettings, settings_space
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.registry import strategy_classes
from memfit.workload import Workload


def candidate_plans(workload: Workload | None = None) -> list[Plan]:
    """Every valid plan built from at most one option per phase, the empty plan first.

    Args:
        workload: passed to each class's `Strategy.space` (options can depend on the device).

    Returns:
        Plans in a deterministic order.
    """
    workload = workload or Workload()
    by_phase: dict[Phase, list[Strategy | RunSettings]] = {}
    for cls in strategy_classes():
        by_phase.setdefault(cls.phase, []).extend(cls.space(workload))
    by_phase.setdefault(Phase.RUNTIME, []).extend(settings_space(workload))
    choices = [[None, *options] for _, options in sorted(by_phase.items())]
    plans = []
    for combo in itertools.product(*choices):
        strategies = tuple(s for s in combo if isinstance(s, Strategy))
        settings = next((s for s in combo if isinstance(s, RunSettings)), RunSettings())
        try:
            plans.append(Plan(strategies, workload, settings).validate())
        except RecipeError:
            continue
    return plans


def budget_plans(model, budget_bytes: int, workload: Workload | None = None) -> list[Plan]:
    """One-strategy plans that size themselves to ``budget_bytes`` (`Strategy.budget_options`)."""
    workload = workload or Workload()
    return [
        Plan((option,), workload).validate()
        for cls in strategy_classes()
        for option in cls.budget_options(model, budget_bytes, workload)
    ]
