"""Prediction without allocation: apply a plan to a meta-tensor copy of the model and count.

Strategies run the same code on meta tensors as on real ones (principle 1 of docs/architecture.md),
so the predicted bytes are the bytes a real run holds, by construction; tests check it.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.errors import BudgetError
from memfit.memory.report import MemoryReport, weight_report
from memfit.memory.workload import profile, synthetic_input_facts
from memfit.plan import Context, Plan, Workload, apply
from memfit.units import format_bytes, parse_bytes

# Generation decodes into a static cache: every single-token step allocates the same shapes, so
# two steps show the steady state (the first could differ in lazily created state). Tests check
# predicted against measured reports of full generations.
DECODE_STEPS = 2


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device: same modules, shapes, dtypes
    and sharing (a tied weight stays one tensor), no data. Costs no tensor memory."""
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter
        ) else meta
    return copy.deepcopy(model, memo)


def estimate(
    model: nn.Module | str | Path, plan: Plan | str = "none", workload: Workload | None = None
) -> MemoryReport:
    """Predict what ``model`` would hold after ``plan`` (and while running ``workload``), without
    allocating or computing anything.

    Args:
        model: a model (real or meta tensors; it is not changed), or a reference: anything
            `memfit.load` accepts, a ``config.json`` path or a bundled config name such as
            ``"llama-3-70b"`` (then only the config is read; see `memfit.models.load.skeleton`).
        plan: a `Plan` or recipe string. Training workloads use its optimizer token (``sgd``)
            or AdamW.
        workload: if given, the workload is run on fake tensors under the tracker and the report
            covers its peak (activations, gradients, optimizer state, KV cache); if None, the
            report holds the weights only.

    Returns:
        A `MemoryReport`, with the same fields `memfit.memory.profile` measures.

    Example:
        >>> memfit.estimate(model, "int4-g128").weight_bytes
        >>> memfit.estimate("llama-3-8b", "bf16,checkpointing", memfit.Workload(mode=memfit.Mode.TRAIN, seq_len=4096))
    """
    if isinstance(model, nn.Module):
        skeleton = meta_copy(model)
    else:
        from memfit.models.load import skeleton as build_skeleton

        skeleton = build_skeleton(model)
    with torch.no_grad():
        apply(skeleton, plan, Context())
    if workload is None:
        return weight_report(skeleton)
    mode = FakeTensorMode()
    _to_fake(skeleton, mode, torch.device(workload.device))
    with mode, synthetic_input_facts():
        return profile(skeleton, workload, decode_steps=DECODE_STEPS)


def _to_fake(model: nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    """Replace every meta tensor of ``model`` by a fake tensor on ``device`` (ties kept), so
    operators dispatch as they would on that device."""
    converter = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in memo:
                    fake = converter.from_meta_and_device(mode, tensor.to("meta"), device)
                    is_param = isinstance(tensor, nn.Parameter)
                    memo[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_param else fake
                table[name] = memo[id(tensor)]


def max_batch_size(
    model: nn.Module | str | Path,
    budget: int | str,
    workload: Workload,
    plan: Plan | str = "none",
    *,
    limit: int = 1 << 16,
) -> int:
    """The largest batch size whose predicted peak fits ``budget`` (bytes, or ``"1GiB"``-style).

    Doubles the batch until the prediction no longer fits, then bisects; each probe is one
    `estimate` on fake tensors, so nothing is allocated.

    Raises:
        BudgetError: even batch size 1 does not fit (the message gives its peak).

    Example:
        >>> max_batch_size(model, "1GiB", Workload(mode=Mode.TRAIN, seq_len=256))
    """
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    if not isinstance(model, nn.Module):
        from memfit.models.load import skeleton

        model = skeleton(model)  # read the config once, not once per probe
    peak = lambda batch: estimate(model, plan, dataclasses.replace(workload, batch_size=batch)).peak_bytes
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
