"""Values a prediction does not have: `memfit.estimate` and the calibration prediction run the
real code on fake tensors (shapes, dtypes and devices, no data), so a branch on a tensor's value
needs the value a real run would see.

Code that reads a value calls `value_or(tensor, assumed)`: on real tensors it is the value; on
fake ones it is ``assumed``, the answer a healthy run gives (a Cholesky factorization succeeds, a
scale folds into the norm before it). Everything else (which tensors are allocated, when they are
freed) is the same code either way, so the tracker sees the same allocations.

Kernels that loop over columns (GPTQ, SparseGPT) run tens of thousands of small operators, and on
fake tensors each costs a dispatch through the tracker and the fake-tensor mode: a prediction that
ran them all would take as long as the calibration. Their allocations depend on their arguments'
shapes alone, so `shape_determined` measures one call per signature under the tracker and replays
its effect (the same peak above the start, the same outputs) for every later call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from memfit.memory.tracker import active_tracker

F = TypeVar("F", bound=Callable[..., Any])


def is_fake(tensor: torch.Tensor) -> bool:
    """True for a tensor with shapes and no data (under `FakeTensorMode`)."""
    return isinstance(tensor, FakeTensor)


def value_or(tensor: torch.Tensor, assumed: Any) -> Any:
    """``tensor.tolist()`` (a Python number for a 0-dim tensor), or ``assumed`` for a fake tensor."""
    return assumed if is_fake(tensor) else tensor.tolist()


def shape_determined(fn: F) -> F:
    """Mark ``fn`` as allocating by its arguments' shapes, dtypes and its other (hashable)
    arguments alone, with no effect but its result. On real tensors it simply runs. On fake
    tensors under a tracker, the first call of each signature runs and is measured (the peak it
    adds above the bytes live at its start, and its outputs); later calls allocate the same
    outputs and a block of the remaining peak, then free the block, so the tracker sees the same
    peak and the same bytes left behind without the operators running again. A call whose
    outputs are views into larger or shared storage is not replayed: it runs every time.
    """
    measured: dict[tuple, tuple[int, list[tuple[torch.Size, torch.dtype, torch.device]], Any] | None] = {}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        leaves = tree_flatten((args, kwargs))[0]
        tracker = active_tracker()
        if tracker is None or not any(isinstance(x, torch.Tensor) and is_fake(x) for x in leaves):
            return fn(*args, **kwargs)
        key = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves)
        if key in measured and measured[key] is not None:
            peak, shapes, spec = measured[key]
            outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in shapes]
            rest = peak - sum(_nbytes(t) for t in outputs)
            if rest > 0:
                block = torch.empty(rest, dtype=torch.uint8, device=outputs[0].device if outputs else "cpu")
                del block
            return tree_unflatten(outputs, spec)
        with tracker.rise() as rise:
            out = fn(*args, **kwargs)
        if key not in measured:
            outputs, spec = tree_flatten(out)
            inputs = {x.untyped_storage()._cdata for x in leaves if isinstance(x, torch.Tensor)}
            storages = [t.untyped_storage() for t in outputs if isinstance(t, torch.Tensor)]
            whole = (
                len(storages) == len(outputs)
                and all(s.nbytes() == _nbytes(t) for s, t in zip(storages, outputs, strict=True))
                and len({s._cdata for s in storages} | inputs) == len(storages) + len(inputs)
            )
            measured[key] = (rise[0], [(t.shape, t.dtype, t.device) for t in outputs], spec) if whole else None
        return out

    return run  # type: ignore[return-value]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
