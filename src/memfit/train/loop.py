"""`train`: next-token fine-tuning of a causal LM under a memory budget, with every allocation tracked.

One function runs every training strategy: the recipe's weight strategies (quantization, casts,
LoRA) are applied first, then the runtime ones shape the loop: the optimizer it builds, the
micro-batches per step (``grad-accum-N``, or chosen under ``budget`` by the estimator), the
processes (``ddp``/``fsdp`` under torchrun), activation checkpointing and autocast inside the
model's forward. Checkpoints are written in the background (`memfit.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import BudgetError, CheckpointError, OutputError, RecipeError
from memfit.memory.report import MemoryReport
from memfit.memory.tracker import PARAMETERS, track
from memfit.plan import Plan, apply
from memfit.settings import Parallelism, RunSettings
from memfit.strategies.training import LoRA
from memfit.train import checkpoint, distributed
from memfit.train.data import TokenWindows, training_windows
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Context, Mode, ProgressFn, Workload

log = logging.getLogger(__name__)

DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 1e-3
WARMUP_SHARE = 0.1  # linear warm-up over the first 10% of steps, then linear decay to 10% of the rate
FLAGS = {"ranks": "nproc", "model": "model (or --teacher, --student)"}  # a fingerprint key's option, where they differ


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the progress callback hears after each optimizer step."""

    step: int  # steps done
    steps: int
    loss: float
    tokens_per_s: float
    peak_bytes: int  # this rank's tracked peak so far


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Args:
        losses: the mean loss of every step of the run (resumed steps included), over all ranks.
        peak_bytes: the tracked peak of each rank, in rank order.
        tokens_per_s: training tokens (all ranks) per second over the steps this call ran.
        out: the saved model's directory, if ``out`` was given.
        report: this rank's `MemoryReport` of the run.
        plan: the plan that ran (with the ``grad-accum-N`` a budget chose).
        model: the trained model (unwrapped; under FSDP, sharded).
    """

    losses: list[float]
    peak_bytes: list[int]
    tokens_per_s: float
    out: Path | None
    report: MemoryReport
    plan: Plan
    model: nn.Module = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """``{"losses", "peak_bytes" (an int, or one per rank), "tokens_per_s", "out"}``."""
        peak: int | list[int] = self.peak_bytes[0] if len(self.peak_bytes) == 1 else self.peak_bytes
        return {"losses": self.losses, "peak_bytes": peak, "tokens_per_s": self.tokens_per_s,
                "out": None if self.out is None else str(self.out), "recipe": self.plan.recipe}


def train(
    model: str | nn.Module,
    tokenizer: Any = None,
    *,
    data: str | None = None,
    steps: int = 100,
    batch: int = 8,
    seq: int = 256,
    recipe: str | Plan = "none",
    lr: float | None = None,
    budget: int | str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    save_every: int = 0,
    device: str | None = None,
    progress: Callable[[StepInfo], None] | None = None,
    work_progress: ProgressFn | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on next-token prediction of ``data`` and return the losses and peak memory.

    Args:
        model: a reference `memfit.load` accepts, or a loaded model (then pass ``tokenizer``).
        data: a UTF-8 text file, or None / ``"builtin"`` for the built-in calibration half.
        steps: optimizer steps in all (a resumed run continues up to ``steps``).
        batch: sequences per optimizer step, over all ranks and micro-batches.
        seq: tokens per sequence.
        recipe: strategies, such as ``"int4-g128,lora-8"`` or ``"bf16-master,adamw-8bit,checkpointing"``.
        lr: peak learning rate (default 1e-4; 1e-3 with LoRA).
        budget: bytes (or ``"2GiB"``) one rank may hold; without ``grad-accum-N`` in the recipe,
            the largest micro-batch whose predicted peak fits is chosen.
        seed: seeds the weights' random parts (LoRA), the data order and dropout.
        out: directory for the trained model (``out/model``) and checkpoints (``out/checkpoints``).
        resume: continue from the last complete checkpoint under ``out``.
        save_every: write a checkpoint every this many steps (0: none before the end).
        device: ``"cpu"``, ``"cuda"``, or None (CUDA when available).
        progress: called after every step with a `StepInfo`.
        work_progress: ``(description, done, total)`` for work before training (calibrated recipes).

    Raises:
        RecipeError, BudgetError, DataError, CheckpointError, ModelNotFoundError: bad input.
    """
    check_sizes(steps, batch, seq, save_every)
    check_run_dir(out, resume)
    try:
        return run(model, tokenizer, device, data=data, steps=steps, batch=batch, seq=seq, recipe=recipe, lr=lr,
                   budget=budget, seed=seed, out=None if out is None else Path(out), resume=resume,
                   save_every=save_every, progress=progress, work_progress=work_progress)
    finally:
        distributed.leave()


def check_sizes(steps: int, batch: int, seq: int, save_every: int) -> None:
    """Raise `RecipeError` unless a run's step count and sizes are positive (``save_every`` at least 0)."""
    if steps < 1 or batch < 1 or seq < 1 or save_every < 0:
        raise RecipeError(f"steps, batch and seq must be positive (got {steps}, {batch}, {seq})", "fix the arguments")


def check_run_dir(out: str | Path | None, resume: bool) -> None:
    """Refuse an ``out`` that is not a training run's directory, or one that would mix two runs.

    Raises:
        OutputError: ``out`` is a file, or holds other things than ``model`` and ``checkpoints``.
        CheckpointError: ``--resume`` without ``out``, or checkpoints of a run there without it.
    """
    if out is None:
        if resume:
            raise CheckpointError("--resume needs the run's output directory", "pass --out DIR of the interrupted run")
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} is a file", "choose a directory path for --out")
    if out.is_dir():
        strangers = sorted(p.name for p in out.iterdir() if p.name not in ("model", "checkpoints"))
        if strangers:
            raise OutputError(
                f"output directory {str(out)!r} holds {strangers[0]!r}, "
                "not only a training run's model and checkpoints",
                "choose a new or empty directory",
            )
    if not resume and checkpoint.complete(out / "checkpoints"):
        raise CheckpointError(
            f"{str(out)!r} already holds checkpoints of a run", "pass --resume to continue it, or choose another --out"
        )


def next_token_loss(trained: nn.Module, ids: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """The plain training objective: the model's own next-token cross-entropy (``rows``: the
    batch's window indices, which objectives with per-window data read)."""
    return trained(ids, labels=ids, use_cache=False).loss


def run(model, tokenizer, device, *, data, steps, batch, seq, recipe, lr, budget, seed, out, resume, save_every,
        progress, work_progress, objective=None, fingerprint_extra=None, predict_objective=None) -> TrainResult:
    """`train`'s body, also the loop of `memfit.train.distill`: ``objective(model, tokenizer, world)``
    builds the step's loss function ``(trained, ids, rows) -> loss`` once the model is applied and placed
    (default: `next_token_loss`); its ``tensors()``, if any, count as held parameters; and
    ``fingerprint_extra`` joins the fingerprint a resumed run must match; ``predict_objective``: the
    objective on fake tensors for ``budget``'s predictions (`memfit.estimate`'s ``objective``)."""
    plan = Plan.parse(recipe) if isinstance(recipe, str) else recipe.validate()
    ranks = distributed.planned_ranks()
    if ranks > 1 and plan.settings.parallelism is None:  # torchrun without a token: data-parallel
        plan = dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, parallelism=Parallelism.DDP))
    device_type = distributed.device_type(device)
    workload = Workload(mode=Mode.TRAIN, batch_size=batch, seq_len=seq, ranks=ranks, device=device_type)
    plan.run.split(workload)  # the batch splits, or a clear error before anything loads

    _seed(seed)
    reference = model if isinstance(model, (str, Path)) else None
    if reference is not None:
        from memfit.io import load

        model, tokenizer = load(str(reference))
    elif tokenizer is None:
        raise RecipeError("train() got a model without its tokenizer", "pass tokenizer=, or a model reference")
    windows = training_windows(tokenizer, data, seq, seed)
    if budget is not None:  # before joining the process group: predicting fsdp starts a fake one
        plan = fit_micro_batch(model, plan, workload, budget, objective=predict_objective)
    settings = plan.run
    micro, count = settings.split(workload)
    world = distributed.join(device_type)

    calibration = None
    if plan.needs_calibration:
        from memfit.data import calibration_windows

        calibration = calibration_windows(tokenizer)
    _seed(seed)  # LoRA's initial A does not depend on what loading drew
    apply(model, plan, Context(calibration=calibration, device=str(world.device), progress=work_progress))
    model.to(world.device)
    model.train()
    trained = distributed.wrap(model, settings.parallelism, world)
    if lr is None:
        lr = DEFAULT_LORA_LR if any(isinstance(s, LoRA) for s in plan.strategies) else DEFAULT_LR
    optimizer = settings.build_optimizer(model, lr)
    warmup = max(1, int(steps * WARMUP_SHARE))
    schedule = lambda s: min((s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, steps - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    loss_fn = next_token_loss if objective is None else objective(model, tokenizer, world)
    fingerprint = {"model": str(reference or type(model).__name__), "recipe": plan.recipe, "steps": steps,
                   "batch": batch, "seq": seq, "seed": seed, "lr": lr, "data": windows.fingerprint,
                   "ranks": world.size, **(fingerprint_extra or {})}
    writer = checkpoint.Writer(out / "checkpoints", world.rank, world.size) if out is not None else None
    start, losses = 0, []
    if resume:
        start, losses = _resume(out / "checkpoints", world, model, optimizer, scheduler, fingerprint)
        if start >= steps:
            raise CheckpointError(
                f"the run under {str(out)!r} already finished its {steps} steps", "start a new run with another --out"
            )

    step_fn = _Stepper(trained, optimizer, scheduler, windows, world, batch, micro, count, settings, loss_fn)
    tokens, seconds = 0, 0.0
    with track(model, optimizer) as tracker:
        if hasattr(loss_fn, "tensors"):  # a teacher: its weights are held too
            tracker.hold(loss_fn.tensors(), PARAMETERS)
        for step in range(start, steps):
            began = time.perf_counter()
            loss = step_fn(step)
            losses.append(loss)
            if step > start or steps - start == 1:  # the first step pays one-time setup
                seconds += time.perf_counter() - began
                tokens += batch * seq
            if writer is not None:
                writer.poll()
                due = save_every and (step + 1) % save_every == 0
                if due or step + 1 == steps:
                    tensors, tree = checkpoint.snapshot(model, optimizer)
                    # a copy: the writer thread serializes it while later steps append to the list
                    state = {"step": step + 1, "losses": list(losses), "scheduler": scheduler.state_dict(),
                             "fingerprint": fingerprint}
                    writer.save(step + 1, tensors, tree, state)
                    del tensors, tree
            if progress is not None:
                progress(StepInfo(step + 1, steps, loss, tokens / seconds if seconds else 0.0, tracker.peak_bytes))
        if writer is not None:
            writer.wait()
    report = tracker.report(top=20)
    peaks = distributed.gather_int(report.peak_bytes, world)
    saved = _save(model, tokenizer, plan, out, world, reference, calibration) if out is not None else None
    return TrainResult(losses=losses, peak_bytes=peaks, tokens_per_s=tokens / seconds if seconds else 0.0,
                       out=saved, report=report, plan=plan, model=model)


class _Stepper:
    """One optimizer step: the micro-batches' forward and backward, then the optimizer."""

    def __init__(self, trained, optimizer, scheduler, windows: TokenWindows, world, batch, micro, count,
                 settings: RunSettings, loss_fn) -> None:
        self.trained, self.optimizer, self.scheduler, self.loss_fn = trained, optimizer, scheduler, loss_fn
        self.windows, self.world, self.batch = windows, world, batch
        self.micro, self.count, self.settings = micro, count, settings

    def __call__(self, step: int) -> float:
        while True:
            try:
                return self._step(step)
            except torch.OutOfMemoryError:
                # Only a single process retries: ranks that disagree on micro-batches would deadlock.
                if self.world.size > 1 or self.micro == 1:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                smaller = max(d for d in range(1, self.micro) if self.micro % d == 0)
                log.warning("out of memory at micro-batch %d; retrying the step with %d", self.micro, smaller)
                self.count, self.micro = self.count * self.micro // smaller, smaller

    def _step(self, step: int) -> float:
        total = 0.0
        parts = self.world.size * self.count
        for i in range(self.count):
            rows = self.windows.rows(step, self.batch, self.world.rank * self.count + i, parts)
            ids = self.windows.windows[rows].to(self.world.device)
            last = i == self.count - 1
            with contextlib.nullcontext() if last else _no_sync(self.trained):
                with self.settings.forward(self.world.device.type):
                    loss = self.loss_fn(self.trained, ids, rows) / self.count
                loss.backward()
            total += float(loss.detach())
            del loss
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.mean(total, self.world)


def _no_sync(trained: nn.Module):
    """Skip the gradient all-reduce of a micro-batch that is not the step's last (DDP, FSDP2)."""
    no_sync = getattr(trained, "no_sync", None)
    if no_sync is not None:
        return no_sync()
    set_sync = getattr(trained, "set_requires_gradient_sync", None)
    if set_sync is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unsynced():
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)

    return unsynced()


def fit_micro_batch(model: nn.Module, plan: Plan, workload: Workload, budget: int | str, *,
                    objective=None) -> Plan:
    """``plan`` with the fewest micro-batches (``grad-accum-N``) whose predicted peak fits ``budget``
    (``objective``: the step's, as `memfit.estimate` takes it; default next-token training).

    With ``grad-accum-N`` already in the plan, only checks that it fits.

    Raises:
        BudgetError: even one sequence per micro-batch does not fit.
    """
    from memfit.estimate import estimate

    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    per_rank = workload.batch_size // workload.ranks
    fixed = plan.settings.micro_batches
    options = [fixed] if fixed else [n for n in range(1, per_rank + 1) if per_rank % n == 0]
    peak = None
    for count in options:
        micro_batches = count if count > 1 else None
        settings = plan.settings if fixed else dataclasses.replace(plan.settings, micro_batches=micro_batches)
        candidate = dataclasses.replace(plan, settings=settings)
        peak = estimate(model, candidate, workload, objective=objective).peak_bytes
        log.info("micro-batch %d: predicted peak %s", per_rank // count, format_bytes(peak))
        if peak <= budget_bytes:
            return candidate
    raise BudgetError(
        f"a micro-batch of {per_rank // options[-1]} sequence(s) of {workload.seq_len} tokens needs "
        f"{format_bytes(peak)}, over the budget of {format_bytes(budget_bytes)}",
        "raise the budget, shorten --seq, or add strategies (checkpointing, adamw-8bit, lora-8)",
    )


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _resume(root: Path, world, model, optimizer, scheduler, fingerprint) -> tuple[int, list[float]]:
    if world.is_main and root.is_dir():
        checkpoint.remove_partial(root)
    found = checkpoint.complete(root)
    if not found:
        log.warning("no complete checkpoint under %s; starting from step 0", root)
        return 0, []
    state, tree = checkpoint.read(found[-1], world.rank)
    if state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") or {}
        differ = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
        raise CheckpointError(
            f"checkpoint {str(found[-1])!r} is from a run with different {', '.join(differ)}",
            f"resume with the run's own {', '.join('--' + FLAGS.get(k, k) for k in differ)}, or start a new run",
        )
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    weights = tree["weights"]
    if sorted(weights) != sorted(params):
        raise CheckpointError(f"checkpoint {str(found[-1])!r} does not match the model's weights", "start a new run")
    with torch.no_grad():
        for name, p in params.items():
            getattr(p, "_local_tensor", p).copy_(weights[name])
    optimizer.load_state_dict(tree["optimizer"])
    _shard_optimizer_state(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(tree["rng"])
    log.info("resumed from %s", found[-1])
    return int(state["step"]), [float(x) for x in state["losses"]]


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints hold each rank's local shards; torch's optimizers under FSDP2 keep DTensors
    (memfit's own step local shards and say so with ``local_state``)."""
    if getattr(optimizer, "local_state", False):
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and key != "step":
                state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False)


def _save(model, tokenizer, plan: Plan, out: Path, world, reference, calibration) -> Path | None:
    """Write the trained model to ``out/model`` (rank 0) in memfit's format."""
    from memfit.io import save

    target = out / "model"
    if world.size > 1 and plan.settings.parallelism is Parallelism.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not world.is_main:
            return target
        if reference is None:
            raise RecipeError("saving an FSDP run needs the model reference", "pass the model as a reference string")
        from memfit.io import load

        model, _ = load(str(reference))
        apply(model, plan, Context(calibration=calibration))
        model.load_state_dict(full)
    elif not world.is_main:
        return target
    save(model.eval(), tokenizer, target)
    return target

