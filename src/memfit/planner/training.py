"""Training plans: the fastest way to run a training workload within a memory budget.

`optimize_training` answers ``memfit optimize --mode train``. Its space is built from the registry
(`training_plans`): what trains (every weight, or adapters on each frozen base the quantization and
cast strategies offer), the training strategies' options (master weights, checkpointing) and the
run settings (autocast, each optimizer, every micro-batch that splits the batch; over several
ranks, ``ddp`` and ``fsdp``). Then:

1. Memory. A plan whose lower bound (its weights, the trainable weights' gradients and the least
   state its optimizer keeps, all held at once while the optimizer steps) is over the budget is
   set aside without a prediction. The rest get the estimator's exact peak, fastest predicted
   first, until enough fit; a plan whose smaller micro-batch is over is over too.
2. Speed, from short measured runs: one micro-batch's forward and backward for each compute
   configuration (what trains, precision, checkpointing), the optimizer's step for each optimizer
   and trainable set, and how the time per sequence changes with the micro-batch (measured once
   per compute dtype, on that dtype's leanest configuration). A plan's step is its micro-batches'
   forwards and backwards plus the optimizer's step. Over several ranks every measurement runs in
   that many processes (`memfit.planner.ranks.RankPool`, sharing the CPU's cores as torchrun's
   ranks do): a micro-batch without the gradient synchronization, and once per configuration the
   extra time of the synchronized one (DDP's all-reduce, FSDP's reduce-scatter) that each step
   pays once; FSDP's optimizer steps a 1 / ranks shard.
3. Verification. The fastest predicted plans that fit run a few real steps of `memfit.train` (in
   the ranks' processes over several); the chosen plan is the fastest measured whose tracked peak
   (the largest rank's) is within the budget. Plans measured within 5% of the fastest run twice
   more, interleaved, and their medians decide.

Lean optimizers are offered only where every weight trains: with adapters the optimizer's state is
the adapters' (under 1% of the model for ``lora-8``), so AdamW is kept.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memfit.errors import BudgetError, RecipeError
from memfit.estimate import estimate
from memfit.memory.report import weight_bytes
from memfit.memory.tracker import track
from memfit.models.meta import meta_copy
from memfit.parallel import World, wrap
from memfit.plan import Plan, apply
from memfit.planner.ranks import RankPool
from memfit.settings import OptimizerKind, Parallelism, RunSettings, settings_space
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.registry import strategy_classes
from memfit.strategies.training import LoRA, MasterWeights
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Context, Mode, ProgressFn, Workload

log = logging.getLogger(__name__)

VERIFY = 3
"""Plans run for real by default: the fastest predicted that fit."""
VERIFY_STEPS = 3
"""Steps of each verification run (the first, which pays one-time setup, is not timed)."""
CLOSE = 0.05
"""Verified plans measured within this fraction of the fastest run again, in interleaved rounds."""
ROUNDS = 3
"""Runs of each of those close plans; the median decides."""

# Bytes of optimizer state per trainable element at the least (AdamW8bit's codes without their
# scales; Adafactor's factored moments can be a vector per matrix).
STATE_BYTES = {OptimizerKind.ADAMW: 8, OptimizerKind.ADAMW_8BIT: 2, OptimizerKind.SGD: 4,
               OptimizerKind.ADAFACTOR: 0}
MASTER_BYTES = 4  # the fp32 master copy of a low-precision trainable element


@dataclasses.dataclass
class TrainCandidate:
    """One training plan the search considered.

    Args:
        plan: the plan (its settings hold the optimizer and micro-batches).
        lower_bound_bytes: bytes held at once while the optimizer steps, at the least.
        predicted_peak_bytes: the estimator's peak; None if not predicted (``skipped`` says why).
        fits: within the budget (by the lower bound, the prediction or a smaller micro-batch).
        predicted_tokens_per_s: from the measured parts; None if not measured.
        measured_tokens_per_s, measured_peak_bytes: of the verification run, if it ran.
        skipped: why the plan was not predicted or not run, else None.
    """

    plan: Plan
    lower_bound_bytes: int
    predicted_peak_bytes: int | None = None
    fits: bool | None = None
    predicted_tokens_per_s: float | None = None
    measured_tokens_per_s: float | None = None
    measured_peak_bytes: int | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.recipe, "lower_bound_bytes": self.lower_bound_bytes,
                "predicted_peak_bytes": self.predicted_peak_bytes, "fits": self.fits,
                "predicted_tokens_per_s": self.predicted_tokens_per_s,
                "measured_tokens_per_s": self.measured_tokens_per_s,
                "measured_peak_bytes": self.measured_peak_bytes, "skipped": self.skipped}


@dataclasses.dataclass
class TrainPlanResult:
    """What `optimize_training` found: the chosen candidate and every candidate, fastest predicted first."""

    budget_bytes: int
    workload: Workload
    best: TrainCandidate
    candidates: list[TrainCandidate]

    def to_json(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "workload": self.workload.to_dict(),
                "plan": self.best.plan.recipe, **{k: v for k, v in self.best.to_dict().items() if k != "plan"},
                "candidates": [c.to_dict() for c in self.candidates]}


def training_plans(workload: Workload) -> list[Plan]:
    """Every training plan of the space, in a deterministic order.

    What trains: every weight, or the adapters of each adapter option on the model as it is or on
    each frozen base that a quantization or cast strategy offers without calibration. Then at most
    one option of each other training strategy (master weights, checkpointing), autocast over
    fp32 weights only, each optimizer (AdamW only with adapters), every micro-batch count that
    splits a rank's share of the batch and, over several ranks, each way of spreading over them.
    """
    if workload.mode is not Mode.TRAIN:
        raise RecipeError("training plans need a training workload", "pass a Workload with mode=Mode.TRAIN")
    classes = strategy_classes()
    adapters = [s for cls in classes if issubclass(cls, LoRA) for s in cls.space(workload)]
    shaping = [cls for cls in classes if cls.train_only or issubclass(cls, MasterWeights)]
    frozen = [s for cls in classes if cls.phase in (Phase.QUANTIZE, Phase.PRECISION) and cls not in shaping
              and not issubclass(cls, LoRA) for s in cls.space(workload) if not s.needs_calibration]
    targets: list[tuple[Strategy, ...]] = [()]
    targets += [(adapter,) for adapter in adapters]
    targets += [(base, adapter) for base in frozen for adapter in adapters]
    others = [[None, *cls.space(workload)] for cls in shaping if not issubclass(cls, LoRA)]
    autocasts = [None, *(s.autocast for s in settings_space(workload) if s.autocast is not None)]
    spreads = [s.parallelism for s in settings_space(workload) if s.parallelism is not None] or [None]
    per_rank = workload.batch_size // workload.ranks
    counts = [n for n in range(1, per_rank + 1) if per_rank % n == 0]
    plans = []
    for target, *chosen in itertools.product(targets, *others):
        strategies = target + tuple(s for s in chosen if s is not None)
        low_precision = any(s.phase is Phase.PRECISION for s in strategies)
        optimizers = list(OptimizerKind) if not target else [OptimizerKind.ADAMW]
        for spread, autocast, optimizer, count in itertools.product(spreads, autocasts, optimizers, counts):
            if autocast is not None and low_precision:
                continue  # the weights already compute in low precision
            settings = RunSettings(optimizer=None if optimizer is OptimizerKind.ADAMW else optimizer,
                                   micro_batches=None if count == 1 else count, autocast=autocast,
                                   parallelism=spread)
            try:
                plans.append(Plan(strategies, workload, settings).validate())
            except RecipeError:
                continue
    return plans


def trains(strategy: Strategy) -> bool:
    """True for a strategy that shapes what trains or how (adapters, master weights, checkpointing);
    False for one that makes the frozen base under the adapters (quantization, a cast)."""
    return isinstance(strategy, (LoRA, MasterWeights)) or strategy.train_only


def compute_plan(plan: Plan) -> Plan:
    """``plan`` without its optimizer and micro-batches: what sets a micro-batch's forward and backward."""
    settings = dataclasses.replace(plan.settings, optimizer=None, micro_batches=None)
    return dataclasses.replace(plan, settings=settings)


def optimize_training(
    model: nn.Module,
    tokenizer: Any,
    budget: int | str,
    workload: Workload,
    *,
    data: str | None = None,
    verify: int = VERIFY,
    steps: int = VERIFY_STEPS,
    seed: int = 0,
    progress: ProgressFn | None = None,
    timer: Callable[..., float] | None = None,
) -> TrainPlanResult:
    """The training plan with the highest throughput whose peak fits ``budget`` (see the module).

    Args:
        model: the model to train (not changed: every measurement runs on a copy).
        tokenizer: its tokenizer (the verification runs read ``data`` through it).
        budget: bytes, or a string such as ``"1GiB"``, one process may hold.
        workload: the training workload (``batch_size`` sequences of ``seq_len`` tokens per step);
            ``ranks`` > 1 searches plans over that many processes (``ddp``, ``fsdp``) and the budget
            is one rank's.
        data: the verification runs' text file (None: the built-in text).
        verify: how many of the fastest predicted plans that fit run for real.
        steps: steps of each verification run.
        progress: ``(description, done, total)`` callback.
        timer: ``timer(model, plan, micro, seq)`` -> seconds of one micro-batch's forward and
            backward, over several ranks also with ``sync=True`` (with the gradient
            synchronization); tests pass their own; default: measured.

    Raises:
        BudgetError: no plan fits (the message names the smallest).
    """
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    plans = training_plans(workload)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(RankPool(model, tokenizer, workload)) if workload.ranks > 1 else None
        timer = timer or (pool.micro_batch if pool is not None else _Timer(model, workload.device).micro_batch)
        return _optimize(model, tokenizer, plans, budget_bytes, workload, timer, pool, data=data, verify=verify,
                         steps=steps, seed=seed, progress=progress)


def _optimize(model, tokenizer, plans: list[Plan], budget_bytes: int, workload: Workload, timer, pool, *, data,
              verify: int, steps: int, seed: int, progress) -> TrainPlanResult:
    search = _Search(model, workload, budget_bytes, timer, progress)
    candidates = [TrainCandidate(plan, search.lower_bound(plan)) for plan in plans]
    for c in candidates:
        if c.lower_bound_bytes > budget_bytes:
            c.fits, c.skipped = False, "its weights, gradients and optimizer state alone are over the budget"
    open_ = [c for c in candidates if c.fits is None]
    if not open_:
        smallest = min(candidates, key=lambda c: c.lower_bound_bytes)
        raise BudgetError(
            f"no training plan fits {format_bytes(budget_bytes)}: the smallest, {smallest.plan.recipe}, holds at "
            f"least {format_bytes(smallest.lower_bound_bytes)} in weights, gradients and optimizer state",
            "raise the budget or train a smaller model",
        )
    search.predict_speed(open_)
    open_.sort(key=_speed_order)
    fitting = search.walk(open_, verify)
    if not fitting:
        predicted = [c for c in candidates if c.predicted_peak_bytes is not None]
        smallest = min(predicted, key=lambda c: c.predicted_peak_bytes)
        raise BudgetError(
            f"no training plan fits {format_bytes(budget_bytes)}: the smallest, {smallest.plan.recipe}, needs "
            f"{format_bytes(smallest.predicted_peak_bytes)}",
            f"raise the budget to at least {format_bytes(smallest.predicted_peak_bytes)}, or shorten --seq",
        )
    if pool is not None:
        def run(plan: Plan) -> tuple[float, int]:
            return pool.train(plan, data=data, steps=steps, batch=workload.batch_size, seq=workload.seq_len,
                              seed=seed)
    else:
        def run(plan: Plan) -> tuple[float, int]:
            from memfit.train.loop import train

            result = train(copy.deepcopy(model), tokenizer, data=data, steps=steps, batch=workload.batch_size,
                           seq=workload.seq_len, recipe=plan, seed=seed, device=workload.device)
            return result.tokens_per_s, result.peak_bytes[0]
    best = _verify(fitting, run, budget_bytes, progress=progress)
    ordered = sorted(candidates, key=_speed_order)
    return TrainPlanResult(budget_bytes=budget_bytes, workload=workload, best=best, candidates=ordered)


def _speed_order(c: TrainCandidate) -> tuple:
    """Fastest predicted first; ties: the larger micro-batch, then the shorter recipe."""
    return (-(c.predicted_tokens_per_s or 0.0), c.plan.settings.micro_batches or 1, len(c.plan.recipe),
            c.plan.recipe)


class _Search:
    def __init__(self, model: nn.Module, workload: Workload, budget_bytes: int, timer, progress) -> None:
        self.model, self.workload, self.budget_bytes = model, workload, budget_bytes
        self.timer, self.progress = timer, progress
        self._held: dict[str, tuple[int, int, int]] = {}

    # -- memory ----------------------------------------------------------------------------------
    def lower_bound(self, plan: Plan) -> int:
        """Weights + the trainable weights' gradients + the least optimizer state (and masters):
        all live while the optimizer steps the last weight of the second step."""
        weights, trainable_bytes, trainable = self._weights(plan)
        run = plan.run
        state = STATE_BYTES[run.optimizer or OptimizerKind.ADAMW] + (MASTER_BYTES if run.master_weights else 0)
        held = weights + trainable_bytes + state * trainable
        return -(-held // self.workload.ranks) if run.parallelism is Parallelism.FSDP else held  # a shard each

    def _weights(self, plan: Plan) -> tuple[int, int, int]:
        """(weight bytes, trainable bytes, trainable elements) of the model after ``plan``'s strategies."""
        key = Plan(plan.strategies).recipe
        if key not in self._held:
            skeleton = meta_copy(self.model)
            with torch.no_grad():
                apply(skeleton, Plan(plan.strategies), Context())
            trainable = [p for p in skeleton.parameters() if p.requires_grad]
            self._held[key] = (weight_bytes(skeleton), sum(p.numel() * p.element_size() for p in trainable),
                               sum(p.numel() for p in trainable))
        return self._held[key]

    def walk(self, ordered: list[TrainCandidate], wanted: int) -> list[TrainCandidate]:
        """Predict peaks fastest first until ``wanted`` plans fit; those after are left unpredicted."""
        over: dict[tuple[str, str], int] = {}  # (compute, optimizer) -> smallest micro-batch over budget
        fitting: list[TrainCandidate] = []
        for done, c in enumerate(ordered):
            if self.progress is not None:
                self.progress("predicting peaks", done, len(ordered))
            if len(fitting) >= wanted:
                c.skipped = c.skipped or "slower than the plans verified"
                continue
            micro, _ = c.plan.run.split(self.workload)
            key = (compute_plan(c.plan).recipe, (c.plan.settings.optimizer or OptimizerKind.ADAMW).value)
            if key in over and over[key] <= micro:
                c.fits, c.skipped = False, "a smaller micro-batch of it is over the budget"
                continue
            c.predicted_peak_bytes = estimate(self.model, c.plan, self.workload).peak_bytes
            c.fits = c.predicted_peak_bytes <= self.budget_bytes
            if c.fits:
                fitting.append(c)
            else:
                over[key] = min(micro, over.get(key, micro))
        return fitting

    # -- speed -----------------------------------------------------------------------------------
    def predict_speed(self, candidates: list[TrainCandidate]) -> None:
        """Each candidate's tokens/s from its compute configuration's measured micro-batch, the
        micro-batch size's factor for its dtype and its optimizer's measured step."""
        seq, batch = self.workload.seq_len, self.workload.batch_size
        computes = {compute_plan(c.plan).recipe: compute_plan(c.plan) for c in candidates}
        micros = {c.plan.run.split(self.workload)[0] for c in candidates}
        families: dict[str, list[Plan]] = {}
        for plan in computes.values():
            families.setdefault(_dtype(plan), []).append(plan)
        ranks = self.workload.ranks
        total = len(computes) * (2 if ranks > 1 else 1) + len(families) * (len(micros) - 1) + 1
        done = 0

        def tick(what: str) -> None:
            nonlocal done
            if self.progress is not None:
                self.progress(f"timing {what}", done, total)
            done += 1

        one: dict[str, float] = {}
        synced: dict[str, float] = {}  # over several ranks: what the step's one synchronized micro-batch adds
        for key, plan in computes.items():
            tick(key)
            one[key] = self.timer(self.model, plan, 1, seq)
            if ranks > 1:
                tick(f"{key} synchronized")
                synced[key] = max(0.0, self.timer(self.model, plan, 1, seq, sync=True) - one[key])
        factor: dict[tuple[str, int], float] = {}
        for family, members in families.items():
            leanest = min(members, key=self.lower_bound)
            base = one[leanest.recipe]
            for micro in sorted(micros):
                if micro > 1:
                    tick(f"{leanest.recipe} at micro-batch {micro}")
                factor[family, micro] = 1.0 if micro == 1 else self.timer(self.model, leanest, micro, seq) / (
                    micro * base)
        tick("optimizer steps")
        steps = _OptimizerTimes(self.model)
        for c in candidates:
            micro, count = c.plan.run.split(self.workload)
            compute = compute_plan(c.plan)
            forward_backward = count * micro * one[compute.recipe] * factor[_dtype(compute), micro]
            forward_backward += synced.get(compute.recipe, 0.0)
            optimizer = steps.seconds(c.plan) / (ranks if c.plan.run.parallelism is Parallelism.FSDP else 1)
            c.predicted_tokens_per_s = batch * seq / (forward_backward + optimizer)


def _dtype(plan: Plan) -> str:
    """The dtype a plan's matmuls compute in: its autocast's, its precision strategy's, or fp32."""
    if plan.settings.autocast is not None:
        return plan.settings.autocast.value
    precision = [s for s in plan.strategies if s.phase is Phase.PRECISION]
    return precision[0].token.split("-")[0] if precision else "fp32"


class _Timer:
    """Seconds of one micro-batch's forward and backward, on a copy of the model with the plan
    applied (frozen bases applied once and copied for each configuration on them)."""

    def __init__(self, model: nn.Module, device: str) -> None:
        self.model, self.device = model, torch.device(device)
        self._base: tuple[str, nn.Module] | None = None

    def applied(self, plan: Plan) -> nn.Module:
        frozen = tuple(s for s in plan.strategies if not trains(s))
        key = Plan(frozen).recipe
        if self._base is None or self._base[0] != key:
            self._base = None  # free the last base first
            base = copy.deepcopy(self.model)
            apply(base, Plan(frozen), Context())
            self._base = (key, base)
        model = copy.deepcopy(self._base[1])
        rest = tuple(s for s in plan.strategies if s not in frozen)
        if rest:
            torch.manual_seed(0)
            apply(model, Plan(rest), Context())
        return model.to(self.device).train()

    def micro_batch(self, _model: nn.Module, plan: Plan, micro: int, seq: int, repeats: int = 2, *,
                    sync: bool = False, world: World | None = None) -> float:
        """Seconds of a micro-batch; in a rank of ``world``, of the plan's wrapped model, with the
        gradient synchronization or (``sync=False``) without, as a step's earlier micro-batches."""
        from memfit.train.loop import _no_sync

        model = self.applied(plan)
        world = world or World(device=self.device)
        trained = wrap(model, plan.run.parallelism, world)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (micro, seq), generator=generator).to(self.device)
        seconds = []
        with track(model):  # as `memfit.train` runs it, every allocation tracked
            for _ in range(repeats + 1):  # the first pays one-time setup
                if world.size > 1:
                    dist.barrier()
                began = time.perf_counter()
                with contextlib.nullcontext() if sync else _no_sync(trained), plan.run.forward(self.device.type):
                    loss = trained(ids, labels=ids, use_cache=False).loss
                    loss.backward()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - began)
                model.zero_grad(set_to_none=True)
        return min(seconds[1:])


class _OptimizerTimes:
    """Seconds of one optimizer step, measured once per optimizer and trainable set (random
    gradients on a copy of the trainable weights; the first step, which creates the state, untimed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._seconds: dict[str, float] = {}

    def seconds(self, plan: Plan) -> float:
        trainable = tuple(s for s in plan.strategies if isinstance(s, (LoRA, MasterWeights)))
        run = plan.run
        key = Plan(trainable, settings=RunSettings(optimizer=run.optimizer)).recipe
        if key not in self._seconds:
            model = copy.deepcopy(self.model)
            torch.manual_seed(0)
            apply(model, Plan(trainable), Context())
            optimizer = run.build_optimizer(model, 1e-6)
            params = [p for p in model.parameters() if p.requires_grad]
            seconds = []
            with track(model, optimizer):
                for _ in range(3):
                    for p in params:
                        p.grad = torch.randn_like(p) * 1e-3
                    began = time.perf_counter()
                    optimizer.step()
                    seconds.append(time.perf_counter() - began)
                    optimizer.zero_grad(set_to_none=True)
            self._seconds[key] = min(seconds[1:])
            del model, optimizer
        return self._seconds[key]


def _verify(fitting: list[TrainCandidate], run: Callable[[Plan], tuple[float, int]], budget_bytes: int, *,
            progress) -> TrainCandidate:
    """``run`` each of ``fitting`` (real steps: tokens/s and tracked peak); the fastest measured
    within the budget. Those within `CLOSE` of the fastest run `ROUNDS` times in all, interleaved,
    and their median tokens/s decides (one run's noise is several percent)."""
    for i, c in enumerate(fitting):
        if progress is not None:
            progress(f"verifying {c.plan.recipe}", i, len(fitting))
        c.measured_tokens_per_s, c.measured_peak_bytes = run(c.plan)
        log.info("%s: %.0f tokens/s measured (%.0f predicted), peak %s (%s predicted)", c.plan.recipe,
                 c.measured_tokens_per_s, c.predicted_tokens_per_s, format_bytes(c.measured_peak_bytes),
                 format_bytes(c.predicted_peak_bytes))
    within = [c for c in fitting if c.measured_peak_bytes <= budget_bytes]
    fastest = max((c.measured_tokens_per_s for c in within), default=0.0)
    close = [c for c in within if c.measured_tokens_per_s >= (1 - CLOSE) * fastest]
    if len(close) > 1:  # too close for one run each: interleaved rounds, medians
        runs = {id(c): [c.measured_tokens_per_s] for c in close}
        for round_ in range(1, ROUNDS):
            for c in close:
                if progress is not None:
                    progress(f"round {round_ + 1} of the closest: {c.plan.recipe}", round_, ROUNDS)
                tokens_per_s, peak = run(c.plan)
                runs[id(c)].append(tokens_per_s)
                c.measured_peak_bytes = max(c.measured_peak_bytes, peak)
        for c in close:
            c.measured_tokens_per_s = statistics.median(runs[id(c)])
        within = [c for c in fitting if c.measured_peak_bytes <= budget_bytes]
    if progress is not None:
        progress("verifying", len(fitting), len(fitting))
    if not within:  # exact in one process; within a few % over several ranks (their buffers)
        least = min(fitting, key=lambda c: c.measured_peak_bytes)
        raise BudgetError(
            f"the {len(fitting)} plan(s) predicted to fit {format_bytes(budget_bytes)} held more when run "
            f"(the least, {least.plan.recipe}, {format_bytes(least.measured_peak_bytes)})",
            f"raise the budget to {format_bytes(least.measured_peak_bytes)}, or pass a larger --verify",
        )
    return max(within, key=lambda c: c.measured_tokens_per_s)
