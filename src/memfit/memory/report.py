"""`MemoryReport`: the one type for predicted and measured memory, and weight byte counting.

A report holds the peak, what was live at the peak by category, the bytes each module allocated
and (for workloads) a timeline; `memfit.estimate` and `memfit.profile` both return one, so
predictions and measurements compare field by field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "kv_cache", "temporary")


@dataclasses.dataclass
class MemoryReport:
    """Bytes by category and by module.

    Args:
        by_category: bytes for each name in `CATEGORIES` (missing ones are 0).
        by_module: ``(fqn, bytes)`` pairs, largest first; each tensor is charged to the first
            module (in ``named_modules`` order) that holds it.
        peak_bytes: the largest total held at once.
        timeline: ``(event index, {category: bytes})`` samples of live memory through a workload
            (empty for weight-only reports); not compared by ``==``.
    """

    by_category: dict[str, int]
    by_module: list[tuple[str, int]]
    peak_bytes: int
    timeline: list[tuple[int, dict[str, int]]] = dataclasses.field(default_factory=list, compare=False, repr=False)

    @property
    def weight_bytes(self) -> int:
        """Parameters plus buffers: what the model holds at rest."""
        return self.by_category.get("parameters", 0) + self.by_category.get("buffers", 0)

    def to_dict(self, top: int = 20) -> dict:
        """``{"peak_bytes", "by_category", "by_module": [[name, bytes], ...]}`` (the ``top`` modules)."""
        return {
            "peak_bytes": self.peak_bytes,
            "by_category": {c: self.by_category.get(c, 0) for c in CATEGORIES},
            "by_module": [[name or "(model)", num_bytes] for name, num_bytes in self.by_module[:top]],
        }

    def diff(self, other: MemoryReport) -> dict[str, int]:
        """``self - other`` per category (for comparing a prediction with a measurement)."""
        return {c: self.by_category.get(c, 0) - other.by_category.get(c, 0) for c in CATEGORIES}


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    # Shared tensors (tied embeddings, views) share a StorageImpl; its address identifies it on
    # every device, meta included (where data pointers are all 0).
    return (str(tensor.device), tensor.untyped_storage()._cdata)


def _held(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for fqn, module in model.named_modules():
        for param in module.parameters(recurse=False):
            yield fqn, "parameters", param
        for buffer in module.buffers(recurse=False):
            yield fqn, "buffers", buffer


def weight_report(model: nn.Module) -> MemoryReport:
    """Bytes of every parameter and buffer ``model`` holds, counting each storage once.

    Counts the whole storage behind a tensor (a view holds its base alive). Works on meta
    tensors, which hold nothing but report the bytes they would hold.
    """
    seen: set[tuple[str, int]] = set()
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_module: dict[str, int] = {}
    for fqn, category, tensor in _held(model):
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        num_bytes = tensor.untyped_storage().nbytes()
        by_category[category] += num_bytes
        by_module[fqn] = by_module.get(fqn, 0) + num_bytes
    ranked = sorted(by_module.items(), key=lambda item: (-item[1], item[0]))
    total = by_category["parameters"] + by_category["buffers"]
    return MemoryReport(by_category=by_category, by_module=ranked, peak_bytes=total)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers, shared storage counted once."""
    return weight_report(model).weight_bytes
