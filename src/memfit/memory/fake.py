"""Values a prediction does not have: `memfit.estimate` and the calibration prediction run the
real code on fake tensors (shapes, dtypes and devices, no data), so a branch on a tensor's value
needs the value a real run would see.

Code that reads a value calls `value_or(tensor, assumed)`: on real tensors it is the value; on
fake ones it is ``assumed``, the answer a healthy run gives (a Cholesky factorization succeeds, a
scale folds into the norm before it). Everything else (which tensors are allocated, when they are
freed) is the same code either way, so the tracker sees the same allocations.

Kernels that loop over columns (GPTQ, SparseGPT) run tens of thousands of small operators, and
each costs a dispatch through the tracker (and, on fake tensors, the fake-tensor mode): a
prediction that ran them all would take as long as the calibration, and a tracked calibration
twice as long as an untracked one. Their allocations depend on their arguments'
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
    arguments alone, with no effect but its result and writes into its arguments (which fake
    tensors do not hold); its first positional tensor tells real calls from fake ones.

    Without a tracker it simply runs. Under a tracker, the first call of each signature runs and
    is measured (the peak it adds above the bytes live at its start, and its outputs). Later calls
    on fake tensors allocate the same outputs and a block of the remaining peak, then free the
    block, so the tracker sees the same peak and the same bytes left behind without the operators
    running again. Later calls on real tensors run with the tracker paused (its per-operator
    hook would otherwise cost more than the kernel), and the tracker then counts their outputs
    and the same block. Real and fake calls are measured separately, so a tracked run's figures
    come from its own first calls. A call whose outputs are views into larger or shared storage
    is not replayed: it runs, tracked, every time.
    """
    measured: dict[tuple, tuple[int, list[Any], Any] | None] = {}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next((x for x in args if isinstance(x, torch.Tensor)), None)
        tracker = active_tracker()
        if first is None or tracker is None:
            return fn(*args, **kwargs)
        fake = is_fake(first)  # a run's tensors are all real or all fake
        if not fake and not tracker.alone():
            return fn(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        key = (fake, *((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves))
        if measured.get(key) is not None:
            peak, recorded, spec = measured[key]
            if fake:
                outputs = [torch.empty(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else x for x in recorded]
                out = tree_unflatten(outputs, spec)
            else:
                with tracker.paused():
                    out = fn(*args, **kwargs)
                outputs = tree_flatten(out)[0]
            tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
            if not fake:  # what ran out of sight is counted now, before the peak block
                tracker.adopt(tensors)
            rest = peak - sum(_nbytes(t) for t in tensors)
            if rest > 0:
                block = torch.empty(rest, dtype=torch.uint8, device=first.device)
                del block
            return out
        with tracker.rise() as rise:
            out = fn(*args, **kwargs)
        if key not in measured:
            measured[key] = _replayable(out, leaves, rise[0])
        return out

    return run  # type: ignore[return-value]


def _replayable(out: Any, inputs: list[Any], peak: int) -> tuple[int, list[Any], Any] | None:
    """``(peak, outputs as (shape, dtype, device) or plain values, tree spec)``, or None when the
    outputs are not new whole tensors (a view of an input, two sharing one storage) or hold
    values other than None, numbers and strings."""
    outputs, spec = tree_flatten(out)
    tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
    if any(not isinstance(x, (torch.Tensor, type(None), bool, int, float, str)) for x in outputs):
        return None
    storages = {t.untyped_storage()._cdata for t in tensors}
    owned = {x.untyped_storage()._cdata for x in inputs if isinstance(x, torch.Tensor)}
    if len(storages) < len(tensors) or storages & owned:
        return None
    if any(t.untyped_storage().nbytes() != _nbytes(t) for t in tensors):
        return None
    recorded = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in outputs]
    return peak, recorded, spec


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
