"""Prediction without allocation: apply a plan to a meta-tensor copy of the model and count.

Strategies run the same code on meta tensors as on real ones (principle 1 of docs/architecture.md),
so the predicted bytes are the bytes a real run holds, by construction; tests check it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from memfit.memory.report import MemoryReport, weight_report
from memfit.plan import Context, Plan, apply


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


def estimate(model: nn.Module, plan: Plan | str) -> MemoryReport:
    """Predict the weight bytes ``model`` would hold after ``plan``, without computing anything.

    Args:
        model: the model as it is now (real or meta tensors; it is not changed).
        plan: a `Plan` or recipe string.

    Returns:
        A `MemoryReport` of parameters and buffers by module, as `weight_report` measures them.

    Example:
        >>> memfit.estimate(model, "int4-g128").weight_bytes
    """
    skeleton = meta_copy(model)
    with torch.no_grad():
        apply(skeleton, plan, Context())
    return weight_report(skeleton)
