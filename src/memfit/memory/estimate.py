"""Prediction without allocation: apply a plan to a meta-tensor copy of the model and count.

Strategies run the same code on meta tensors as on real ones (principle 1 of docs/architecture.md),
so the predicted bytes are the bytes a real run holds, by construction; tests check it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.errors import BudgetError
from memfit.memory.report import MemoryReport, weight_report
from memfit.memory.workload import profile, synthetic_input_facts
from memfit.plan import Context, Plan, Workload, apply
from memfit.units import format_bytes, parse_bytes


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
    model: nn.Module, plan: Plan | str = "none", workload: Workload | None = None, *, optimizer: str = "adamw"
) -> MemoryReport:
    """Predict what ``model`` would hold after ``plan`` (and while running ``workload``), without
    allocating or computing anything.

    Args:
        model: the model as it is now (real or meta tensors; it is not changed).
        plan: a `Plan` or recipe string.
        workload: if given, the workload is run on fake tensors under the tracker and the report
            covers its peak (activations, gradients, optimizer state, KV cache); if None, the
            report holds the weights only.
        optimizer: ``adamw`` or ``sgd``, for training workloads.

    Returns:
        A `MemoryReport`, with the same fields `memfit.memory.profile` measures.

    Example:
        >>> memfit.estimate(model, "int4-g128").weight_bytes
        >>> memfit.estimate(model, "none", memfit.Workload(mode=memfit.Mode.TRAIN, batch_size=2, seq_len=256))
    """
    skeleton = meta_copy(model)
    with torch.no_grad():
        apply(skeleton, plan, Context())
    if workload is None:
        return weight_report(skeleton)
    mode = FakeTensorMode()
    _to_fake(skeleton, mode, torch.device(workload.device))
    with mode, synthetic_input_facts():
        return profile(skeleton, workload, optimizer)


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
    model: nn.Module,
    budget: int | str,
    workload: Workload,
    plan: Plan | str = "none",
    *,
    optimizer: str = "adamw",
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
    peak = lambda batch: estimate(model, plan, dataclasses.replace(workload, batch_size=batch), optimizer=optimizer)
    first = peak(1).peak_bytes
    if first > budget_bytes:
        raise BudgetError(
            f"batch size 1 needs {format_bytes(first)}, over the budget of {format_bytes(budget_bytes)}",
            "raise the budget, shorten the sequence or add memory-saving strategies to the recipe",
        )
    fits, too_big = 1, None
    while too_big is None and fits < limit:  # grow: 1, 2, 4, ...
        candidate = min(fits * 2, limit)
        if peak(candidate).peak_bytes <= budget_bytes:
            fits = candidate
        else:
            too_big = candidate
    while too_big is not None and too_big - fits > 1:  # bisect between a fit and a miss
        middle = (fits + too_big) // 2
        if peak(middle).peak_bytes <= budget_bytes:
            fits = middle
        else:
            too_big = middle
    return fits
