"""Prediction without allocation: apply a plan to a meta-tensor copy of the model and count.

Strategies run the same code on meta tensors as on real ones (principle 1 of docs/architecture.md),
so the predicted bytes are the bytes a real run holds, by construction; tests check it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.errors import BudgetError, ModelNotFoundError, RecipeError
from memfit.io import skeleton as build_skeleton
from memfit.memory.report import MemoryReport, weight_report
from memfit.models.meta import meta_copy, to_fake
from memfit.plan import Plan, apply
from memfit.profile import profile, synthetic_input_facts
from memfit.settings import Parallelism, RunSettings
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Context, Mode, Workload

# Generation decodes into a static cache: every single-token step allocates the same shapes, so
# two steps show the steady state (the first could differ in lazily created state). Tests check
# predicted against measured reports of full generations.
DECODE_STEPS = 2
# Likewise a training step's micro-batches: from the second on, each adds into the gradients the
# first created, allocating the same bytes in the same order, so two show the step's peak.
MICRO_BATCHES = 2


def estimate(
    model: nn.Module | str | Path, plan: Plan | str = "none", workload: Workload | None = None, *, objective=None
) -> MemoryReport:
    """Predict what ``model`` would hold after ``plan`` (and while running ``workload``), without
    allocating or computing anything.

    Args:
        model: a model (real or meta tensors; it is not changed), or a reference: anything
            `memfit.load` accepts, a ``config.json`` path or a bundled config name such as
            ``"llama-3-70b"`` (then only the config is read; see `memfit.io.skeleton`).
        plan: a `Plan` or recipe string. Its run settings (`Plan.run`: the optimizer, ``sgd``;
            micro-batches; processes; autocast) shape the workload; AdamW by default.
        workload: if given, the workload is run on fake tensors under the tracker and the report
            covers its peak (activations, gradients, optimizer state, KV cache); if None, the
            report holds the weights only.
        objective: for a training workload, ``objective(skeleton, fake_mode, device)`` builds the
            step's loss function on the fake model (`memfit.profile`'s ``loss_fn``: a distillation
            step, its teacher on fake tensors too); default the model's next-token loss.

    Returns:
        A `MemoryReport`, with the same fields `memfit.profile` measures.

    Example:
        >>> memfit.estimate(model, "int4-g128").weight_bytes
        >>> memfit.estimate("llama-3-8b", "bf16,checkpointing", memfit.Workload(mode=memfit.Mode.TRAIN, seq_len=4096))
    """
    plan = Plan.parse(plan) if isinstance(plan, str) else plan.validate()
    skeleton = meta_copy(model) if isinstance(model, nn.Module) else build_skeleton(model)
    with torch.no_grad():
        apply(skeleton, plan, Context())
    if workload is None:
        return weight_report(skeleton)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # module-level constants (bit tables) stay real
    to_fake(skeleton, mode, torch.device(workload.device))
    settings = plan.run
    if workload.mode is Mode.TRAIN and workload.ranks > 1 and settings.parallelism is not None:
        if objective is not None:
            raise RecipeError("predictions of a distillation step run one process", "estimate it without --nproc")
        return _estimate_ranks(skeleton, workload, mode, settings)
    device = torch.device(workload.device)
    loss_fn = objective(skeleton, mode, device) if objective is not None else None
    with mode, synthetic_input_facts():
        return profile(skeleton, workload, settings, decode_steps=DECODE_STEPS, micro_batches=MICRO_BATCHES,
                       loss_fn=loss_fn)


def _estimate_ranks(
    skeleton: nn.Module, workload: Workload, mode: FakeTensorMode, settings: RunSettings
) -> MemoryReport:
    """One rank of a ``ddp``/``fsdp`` run.

    FSDP2 runs for real on the fake tensors, over a fake process group of ``workload.ranks``
    (collectives return tensors of the right shapes without communicating), so the shards, the
    gathered layers and the reduce-scatter buffers are all tracked. DDP's C++ reducer cannot run
    on fake tensors; its run is one rank's share of the batch plus what DDP adds: after the first
    step its gradient buckets (one flat buffer per bucket, the gradients are views into them)
    stay allocated, a trainable-parameter-sized block.
    """
    from memfit.parallel import World, wrap

    kind = settings.parallelism
    if kind is Parallelism.DDP:
        with mode, synthetic_input_facts():
            report = profile(skeleton, workload, settings)
        buckets = sum(p.numel() * p.element_size() for p in skeleton.parameters() if p.requires_grad)
        report.by_category["gradients"] += buckets
        report.peak_bytes += buckets
        return report
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        raise RecipeError(
            "predicting an fsdp run needs a process without a process group (it starts a fake one)",
            "call memfit.estimate before init_process_group, or in another process",
        )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=workload.ranks)
    try:
        mesh_device = torch.device(workload.device)
        mesh = init_device_mesh(mesh_device.type, (workload.ranks,))  # outside fake mode: it reads values
        with mode, synthetic_input_facts():
            wrap(skeleton, kind, World(rank=0, size=workload.ranks, device=mesh_device), mesh)
            return profile(skeleton, workload, settings)
    finally:
        dist.destroy_process_group()


def max_batch_size(
    model: nn.Module | str | Path,
    budget: int | str,
    workload: Workload,
    plan: Plan | str = "none",
    *,
    limit: int = 1 << 16,
    objective=None,
) -> int:
    """The largest batch size whose predicted peak fits ``budget`` (bytes, or ``"1GiB"``-style);
    ``objective``: a training step's, as `estimate` takes it.

    Doubles the batch until the prediction no longer fits, then bisects; each probe is one
    `estimate` on fake tensors, so nothing is allocated.

    Raises:
        BudgetError: even batch size 1 does not fit (the message gives its peak).

    Example:
        >>> max_batch_size(model, "1GiB", Workload(mode=Mode.TRAIN, seq_len=256))
    """
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    if not isinstance(model, nn.Module):
        model = build_skeleton(model)  # read the config once, not once per probe
    peak = lambda batch: estimate(model, plan, dataclasses.replace(workload, batch_size=batch),
                                  objective=objective).peak_bytes
    first = peak(1)
    if first > budget_bytes:
        raise BudgetError(
            f"batch size 1 needs {format_bytes(first)}, over the budget of {format_bytes(budget_bytes)}",
            "raise the budget, shorten the sequence or add memory-saving strategies to the recipe",
        )
    fits, too_big = 1, None
    while too_big is None and fits < limit:  # grow: 1, 2, 4, ...
        candidate = min(fits * 2, limit)
        if peak(candidate) <= budget_bytes:
            fits = candidate
        else:
            too_big = candidate
    while too_big is not None and too_big - fits > 1:  # bisect between a fit and a miss
        middle = (fits + too_big) // 2
        if peak(middle) <= budget_bytes:
            fits = middle
        else:
            too_big = middle
    return fits


def placement_inputs(ref: str | Path, plan: Plan) -> tuple[nn.Module, dict, bool]:
    """What `memfit.offload.plan_placement` needs for ``ref`` under ``plan``: ``(meta model, stored
    tensors, whether they are files on this machine)``.

    A model directory is placed as its files store it, so its ``plan`` may hold run settings only
    (``kv-int8``); a config (``llama-3-70b``, a ``config.json``) gets ``plan``'s strategies applied
    on the meta device, and its tensors are placed at the bytes they would have.

    Raises:
        RecipeError: a model directory with weight strategies in ``plan``.
    """
    from memfit.io import StoredTensor, stored_tensors

    try:
        stored = stored_tensors(ref)
    except ModelNotFoundError:
        stored = None
    if stored is not None:
        if plan.strategies:
            raise RecipeError(f"{str(ref)!r} is streamed as its files store it; --recipe {plan.recipe} would change it",
                              "save the model with the recipe first (memfit compress), or keep only run settings "
                              "such as kv-int8")
        return build_skeleton(ref), stored, True
    skeleton = build_skeleton(ref)
    with torch.no_grad():
        apply(skeleton, plan, Context())
    where = Path(str(ref))
    stored = {name: StoredTensor(where, 0, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
              for name, t in skeleton.state_dict().items()}
    return skeleton, stored, False
