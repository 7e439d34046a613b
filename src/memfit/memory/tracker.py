"""Live memory tracking: every tensor storage allocated and freed while code runs, by category and module.

`track()` is a context manager around a `TorchDispatchMode`. Each operator's outputs are inspected;
a storage not seen before is an allocation, charged to the innermost module running at the time
(forward or backward, through PyTorch's ``ModTracker``) and to a category. A weak reference on the
storage reports the free. Categories follow what a storage turns out to be: the model's parameters
and buffers (registered at entry), gradients (a parameter's ``.grad``), optimizer state (reachable
from ``optimizer.state``), the KV cache (reachable from the cache object passed to `Tracker.hold`),
activations (allocated inside a module's forward) and temporaries (everything else: backward's
intermediates, the optimizer's arithmetic, work between modules). Storages are re-examined
as each gradient accumulates, after each optimizer step and whenever `Tracker.hold` is called.

The report charges every storage to what it turned out to be, over its whole life: Adam's moments
allocated inside the first ``step()`` are optimizer state at the peak even though the tracker
learns so only when the step returns. For that the tracker keeps a log of allocations and frees;
the peak and the timeline are replayed from it. It runs on real tensors (CPU or CUDA) and under
``FakeTensorMode``, which is how `memfit.estimate` predicts without allocating.

Example:
    >>> with memfit.memory.track(model) as tracker:
    ...     model(ids)
    >>> tracker.report().peak_bytes
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memfit.memory.report import CATEGORIES, MemoryReport

PARAMETERS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, KV_CACHE, TEMPORARY = CATEGORIES


class _Block:
    """One storage: its size, what it is and which module allocated it."""

    __slots__ = ("category", "module", "num_bytes")

    def __init__(self, num_bytes: int, category: str, module: str) -> None:
        self.num_bytes, self.category, self.module = num_bytes, category, module


class Tracker(TorchDispatchMode):
    """Records allocations and frees while active; use through `track`."""

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self._live_blocks: dict[int, int] = {}  # storage key -> index into _blocks, while alive
        self._blocks: list[_Block] = []  # every storage seen, alive or freed
        self._refs: dict[int, weakref.ref] = {}
        self._events: list[int] = []  # block index + 1 when allocated, -(index + 1) when freed
        self._live = dict.fromkeys(CATEGORIES, 0)  # by the category known now
        self._live_total = 0
        self._peak_bytes = 0
        self._peak_event = -1  # the event after which the peak was reached
        self._by_module: dict[str, int] = {}  # bytes allocated per module (cumulative)
        self._held: list[tuple[Any, str]] = []
        self._mod_tracker = None
        self._names: dict[str, str] = {}

    # -- entering and leaving ---------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        from torch.distributed._tools.mod_tracker import ModTracker

        self._mod_tracker = ModTracker()
        self._mod_tracker.__enter__()
        if self.model is not None:
            root = type(self.model).__name__
            self._names = {f"{root}.{n}" if n else root: n for n, _ in self.model.named_modules()}
            for name, param in self.model.named_parameters():
                self._add(param, PARAMETERS, name.rpartition(".")[0])
                if param.grad is not None:
                    self._add(param.grad, GRADIENTS, name.rpartition(".")[0])
            for name, buffer in self.model.named_buffers():
                self._add(buffer, BUFFERS, name.rpartition(".")[0])
            self._hook_handles = [
                p.register_post_accumulate_grad_hook(lambda p: self._add(p.grad, GRADIENTS, None, move=True))
                for p in self.model.parameters()
                if p.requires_grad
            ]
        if self.optimizer is not None:
            self._classify_optimizer_state()
            self._step_handle = self.optimizer.register_step_post_hook(
                lambda *_: self._classify_optimizer_state()
            )
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._mod_tracker.__exit__(*exc)
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        if getattr(self, "_step_handle", None) is not None:
            self._step_handle.remove()

    # -- what callers tell the tracker --------------------------------------------------------------
    def hold(self, obj: Any, category: str = KV_CACHE) -> None:
        """Mark every tensor reachable from ``obj`` (a KV cache, a list, a tensor) as ``category``,
        now and whenever the tracker re-examines storages later."""
        self._held.append((obj, category))
        self._classify_held()

    # -- the dispatch hook --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        module = self._current_module()
        # inside a module's forward: an activation; in backward, the optimizer step or between
        # modules: a temporary
        category = ACTIVATIONS if module is not None and not self._mod_tracker.is_bw else TEMPORARY
        module = module or ""
        for tensor in _tensors(out):
            self._add(tensor, category, module)
        return out

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _current_module(self) -> str | None:
        parents = [p for p in self._mod_tracker.parents if p != "Global"]
        if not parents:
            return None
        innermost = max(parents, key=len)
        return self._names.get(innermost, innermost)

    def _add(self, tensor: torch.Tensor, category: str, module: str | None, move: bool = False) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        index = self._live_blocks.get(key)
        if index is not None:
            if move:
                self._move(self._blocks[index], category)
            return
        block = _Block(storage.nbytes(), category, module or "")
        index = len(self._blocks)
        self._blocks.append(block)
        self._live_blocks[key] = index
        self._refs[key] = weakref.ref(storage, lambda _, key=key, index=index: self._free(key, index))
        self._live[category] += block.num_bytes
        self._live_total += block.num_bytes
        self._by_module[block.module] = self._by_module.get(block.module, 0) + block.num_bytes
        self._events.append(index + 1)
        if self._live_total > self._peak_bytes:
            self._peak_bytes, self._peak_event = self._live_total, len(self._events) - 1

    def _free(self, key: int, index: int) -> None:
        if self._live_blocks.get(key) != index:
            return
        del self._live_blocks[key]
        self._refs.pop(key, None)
        block = self._blocks[index]
        self._live[block.category] -= block.num_bytes
        self._live_total -= block.num_bytes
        self._events.append(-(index + 1))

    def _move(self, block: _Block, category: str) -> None:
        if block.category != category:
            self._live[block.category] -= block.num_bytes
            self._live[category] += block.num_bytes
            block.category = category

    def _reclassify(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        for tensor in tensors:
            index = self._live_blocks.get(tensor.untyped_storage()._cdata)
            if index is None:
                self._add(tensor, category, None)
            else:
                self._move(self._blocks[index], category)

    def _classify_optimizer_state(self) -> None:
        for state in self.optimizer.state.values():
            self._reclassify(_tensors(state), OPTIMIZER_STATE)

    def _classify_held(self) -> None:
        for obj, category in self._held:
            self._reclassify(_tensors(obj), category)

    def _replay(self, until: int) -> Iterator[tuple[int, dict[str, int]]]:
        """``(event, bytes by final category)`` after each event up to ``until`` (inclusive)."""
        live = dict.fromkeys(CATEGORIES, 0)
        for event, code in enumerate(self._events[: until + 1]):
            block = self._blocks[abs(code) - 1]
            live[block.category] += block.num_bytes if code > 0 else -block.num_bytes
            yield event, live

    # -- results -------------------------------------------------------------------------------------
    @property
    def live_bytes(self) -> int:
        """Bytes live now (all categories)."""
        return self._live_total

    @property
    def live(self) -> dict[str, int]:
        """Bytes live now, by the category each storage is known to have now."""
        return dict(self._live)

    def timeline(self, points: int | None = None) -> list[tuple[int, dict[str, int]]]:
        """Live bytes by category after every allocation and free: ``(event index, {category: bytes})``.

        Categories are final (see the module docstring). With ``points``, about that many evenly
        spaced events are kept, always including the peak and the last event.
        """
        last = len(self._events) - 1
        step = max(1, (last + 1) // points) if points else 1
        keep = lambda event: event % step == 0 or event in (self._peak_event, last)
        return [(event, dict(live)) for event, live in self._replay(last) if keep(event)]

    def report(self, top: int | None = None) -> MemoryReport:
        """The peak and what was live at that moment by (final) category; bytes allocated per module."""
        at_peak = dict.fromkeys(CATEGORIES, 0)
        for _, live in self._replay(self._peak_event):
            at_peak = live
        ranked = sorted(self._by_module.items(), key=lambda item: (-item[1], item[0]))
        return MemoryReport(
            by_category=dict(at_peak),
            by_module=ranked[:top] if top else ranked,
            peak_bytes=self._peak_bytes,
        )


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure of lists, tuples, dicts and objects with tensor attributes."""
    stack = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple, dict)):
            stack.extend(tree_flatten(item)[0] if not isinstance(item, dict) else item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, (nn.Module, type)):
            stack.extend(vars(item).values())


def track(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> Tracker:
    """Track every allocation while the ``with`` block runs.

    Args:
        model: its parameters, buffers and existing gradients count from the start, under their
            categories; later gradients are recognised as they accumulate.
        optimizer: its state is recognised after each ``step()``.

    Returns:
        The `Tracker` (a context manager); call ``report()`` after the block.
    """
    return Tracker(model, optimizer)
