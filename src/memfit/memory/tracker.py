"""Live memory tracking: every tensor storage allocated and freed while code runs, by category and module.

`track()` is a context manager around a `TorchDispatchMode`. Each operator's outputs are inspected;
a storage not seen before is an allocation, charged to the innermost module running at the time
(forward or backward, see `_ModuleStack`) and to a category. A weak reference on the
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

import array
import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memfit.memory.report import CATEGORIES, MemoryReport

PARAMETERS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, KV_CACHE, TEMPORARY = CATEGORIES
_CATEGORY_INDEX = {c: i for i, c in enumerate(CATEGORIES)}
OPTIMIZER = "(optimizer step)"  # the module name charged with the optimizer's temporaries


class Tracker(TorchDispatchMode):
    """Records allocations and frees while active; use through `track`."""

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        # Every storage seen, alive or freed, as a block index into three compact columns (a long
        # generation sees hundreds of thousands; Python objects per block would show in the RSS).
        self._sizes = array.array("q")  # bytes
        self._categories = bytearray()  # index into CATEGORIES
        self._modules = array.array("l")  # index into _module_names
        self._module_names: list[str] = []
        self._module_ids: dict[str, int] = {}
        self._live_blocks: dict[int, int] = {}  # storage key -> block index, while alive
        self._refs: dict[int, weakref.ref] = {}
        self._events = array.array("q")  # block index + 1 when allocated, -(index + 1) when freed
        self._live = dict.fromkeys(CATEGORIES, 0)  # by the category known now
        self._live_total = 0
        self._peak_bytes = 0
        self._peak_event = -1  # the event after which the peak was reached
        self._param_modules: dict[int, str] = {}  # id(parameter) -> the module holding it
        self._held: list[tuple[Any, str]] = []
        self._in_step = False
        self._window_peak = 0  # the most live at once since `rise` began measuring

    # -- entering and leaving ---------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        self._stack = _ModuleStack(self.model)
        self._stack.__enter__()
        if self.model is not None:
            for name, param in self.model.named_parameters():
                self._param_modules[id(param)] = name.rpartition(".")[0]
                self._add(param, PARAMETERS, name.rpartition(".")[0])
                if param.grad is not None:
                    self._add(param.grad, GRADIENTS, name.rpartition(".")[0])
            for name, buffer in self.model.named_buffers():
                self._add(buffer, BUFFERS, name.rpartition(".")[0])
            self._hook_handles = [
                p.register_post_accumulate_grad_hook(
                    lambda p: self._add(p.grad, GRADIENTS, self._param_modules.get(id(p)), move=True)
                )
                for p in self.model.parameters()
                if p.requires_grad
            ]
        if self.optimizer is not None:
            self._classify_optimizer_state()
            self._step_handles = [
                self.optimizer.register_step_pre_hook(lambda *_: setattr(self, "_in_step", True)),
                self.optimizer.register_step_post_hook(lambda *_: self._end_step()),
            ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stack.__exit__(*exc)
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        for handle in getattr(self, "_step_handles", []):
            handle.remove()

    # -- what callers tell the tracker --------------------------------------------------------------
    def hold(self, obj: Any, category: str = KV_CACHE) -> None:
        """Mark every tensor reachable from ``obj`` (a KV cache, a list, a tensor) as ``category``,
        now and whenever the tracker re-examines storages later."""
        self._held.append((obj, category))
        self._classify_held()

    @contextlib.contextmanager
    def rise(self) -> Iterator[list[int]]:
        """Measure the most bytes live at once inside the block above what was live at its start:
        ``with tracker.rise() as rise: ...`` then ``rise[0]``."""
        outer, start = self._window_peak, self._live_total
        self._window_peak = start
        result = [0]
        try:
            yield result
        finally:
            result[0] = self._window_peak - start
            self._window_peak = max(outer, self._window_peak)

    # -- the dispatch hook --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # most operators return one tensor, and many (views, in-place updates) a known storage:
        # those cost a dictionary look-up (this hook runs on every operator of a run)
        if isinstance(out, torch.Tensor):
            if _local(out).untyped_storage()._cdata in self._live_blocks:
                return out
            outputs: Iterable[torch.Tensor] = (out,)
        else:
            outputs = list(_tensors(out))
        category, module = self._where()
        for tensor in outputs:
            self._add(tensor, category, module)
        return out

    def _where(self) -> tuple[str, str]:
        """The category and module a tensor allocated now is counted under."""
        in_backward = torch._C._current_graph_task_id() != -1
        module = OPTIMIZER if self._in_step else self._stack.current(in_backward)
        # inside a module's forward: an activation; in backward, the optimizer step or between
        # modules: a temporary
        category = ACTIVATIONS if module not in (None, OPTIMIZER) and not in_backward else TEMPORARY
        return category, module or ""

    # -- operators run out of sight (memfit.memory.fake.shape_determined on real tensors) -------------
    def alone(self) -> bool:
        """True if this tracker is the only dispatch mode active (no fake-tensor mode under it)."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return _get_current_dispatch_mode_stack() == [self]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run operators without recording them; count what they leave behind with `adopt`."""
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            yield

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made while `paused` as allocated now (storages already counted are skipped)."""
        category, module = self._where()
        for tensor in tensors:
            self._add(tensor, category, module)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _add(self, tensor: torch.Tensor, category: str, module: str | None, move: bool = False) -> None:
        storage = _local(tensor).untyped_storage()
        key = storage._cdata
        index = self._live_blocks.get(key)
        if index is not None:
            if move:
                self._move(index, category, module)
            return
        num_bytes = storage.nbytes()
        index = len(self._sizes)
        self._sizes.append(num_bytes)
        self._categories.append(_CATEGORY_INDEX[category])
        self._modules.append(self._module_id(module or ""))
        self._live_blocks[key] = index
        self._refs[key] = weakref.ref(storage, lambda _, key=key, index=index: self._free(key, index))
        self._live[category] += num_bytes
        self._live_total += num_bytes
        self._events.append(index + 1)
        if self._live_total > self._window_peak:
            self._window_peak = self._live_total
        if self._live_total > self._peak_bytes:
            self._peak_bytes, self._peak_event = self._live_total, len(self._events) - 1

    def _free(self, key: int, index: int) -> None:
        if self._live_blocks.get(key) != index:
            return
        del self._live_blocks[key]
        self._refs.pop(key, None)
        self._live[CATEGORIES[self._categories[index]]] -= self._sizes[index]
        self._live_total -= self._sizes[index]
        self._events.append(-(index + 1))

    def _module_id(self, name: str) -> int:
        if name not in self._module_ids:
            self._module_ids[name] = len(self._module_names)
            self._module_names.append(name)
        return self._module_ids[name]

    def _move(self, index: int, category: str, module: str | None = None) -> None:
        if module is not None:
            self._modules[index] = self._module_id(module)
        old = CATEGORIES[self._categories[index]]
        if old != category:
            self._live[old] -= self._sizes[index]
            self._live[category] += self._sizes[index]
            self._categories[index] = _CATEGORY_INDEX[category]

    def _reclassify(self, tensors: Iterable[torch.Tensor], category: str, module: str | None = None) -> None:
        for tensor in tensors:
            index = self._live_blocks.get(_local(tensor).untyped_storage()._cdata)
            if index is None:
                self._add(tensor, category, module)
            else:
                self._move(index, category, module)

    def _end_step(self) -> None:
        self._in_step = False
        self._classify_optimizer_state()

    def _classify_optimizer_state(self) -> None:
        for param, state in self.optimizer.state.items():
            self._reclassify(_tensors(state), OPTIMIZER_STATE, self._param_modules.get(id(param)))
        # optimizers that hold more than ``state`` (fp32 master copies) list it in ``state_tensors``
        extra = getattr(self.optimizer, "state_tensors", None)
        if extra is not None:
            self._reclassify(_tensors(extra), OPTIMIZER_STATE, None)

    def _classify_held(self) -> None:
        for obj, category in self._held:
            self._reclassify(_tensors(obj), category)

    def _replay(self, until: int) -> Iterator[tuple[int, list[int]]]:
        """``(event, bytes by final category in CATEGORIES order)`` after each event up to
        ``until`` (inclusive); the list is reused between events."""
        live = [0] * len(CATEGORIES)
        sizes, categories = self._sizes, self._categories
        for event, code in enumerate(self._events[: until + 1]):
            index = abs(code) - 1
            live[categories[index]] += sizes[index] if code > 0 else -sizes[index]
            yield event, live

    def _live_at(self, until: int) -> list[int]:
        """Indices of the blocks live after event ``until``."""
        live: set[int] = set()
        for code in self._events[: until + 1]:
            if code > 0:
                live.add(code - 1)
            else:
                live.discard(-code - 1)
        return sorted(live)

    # -- results -------------------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        """The largest total held at once so far."""
        return self._peak_bytes

    @property
    def events(self) -> int:
        """Allocations and frees recorded so far (a position in the run, for `peak_event`)."""
        return len(self._events)

    @property
    def peak_event(self) -> int:
        """The position (see `events`) of the event after which the peak was reached; -1 before any."""
        return self._peak_event

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
        return [(event, dict(zip(CATEGORIES, live, strict=True))) for event, live in self._replay(last) if keep(event)]

    def report(self, top: int | None = None, timeline_points: int | None = None) -> MemoryReport:
        """The peak, and what was live at that moment by (final) category and by module (the
        ``top`` ones); with ``timeline_points``, a timeline of about that many samples.

        A module is charged its parameters and buffers, their gradients and optimizer state, and
        what it allocated in forward or backward that was live at the peak.
        """
        at_peak = dict.fromkeys(CATEGORIES, 0)
        by_module: dict[str, int] = {}
        for index in self._live_at(self._peak_event):
            module = self._module_names[self._modules[index]]
            at_peak[CATEGORIES[self._categories[index]]] += self._sizes[index]
            by_module[module] = by_module.get(module, 0) + self._sizes[index]
        ranked = sorted(by_module.items(), key=lambda item: (-item[1], item[0]))
        return MemoryReport(
            by_category=dict(at_peak),
            by_module=ranked[:top] if top else ranked,
            peak_bytes=self._peak_bytes,
            timeline=self.timeline(timeline_points) if timeline_points else [],
        )


class _ModuleStack:
    """Which module is running: a stack of forward calls, and one of modules in backward.

    Forward: global pre/post forward hooks push and pop each module. Backward (only when the
    forward recorded a graph): a hook on a module's outputs pushes it when its gradients arrive,
    one on its inputs pops it when they are computed, and the stack empties when backward ends.
    Nothing is registered for forwards without gradients, so inference keeps no per-call state.
    """

    def __init__(self, model: nn.Module | None) -> None:
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._forward: list[str] = []
        self._backward: list[str] = []
        self._reset_queued = False

    def __enter__(self) -> _ModuleStack:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._pre_forward),
            register_module_forward_hook(self._post_forward, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def current(self, in_backward: bool) -> str | None:
        """The innermost running module's name ("" for the root), or None outside any."""
        if self._forward:  # a forward, or a checkpointed layer recomputed inside backward
            return self._forward[-1]
        if in_backward and self._backward:
            return self._backward[-1]
        return None

    def _name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        name = self._name(module)
        self._forward.append(name)
        if _records_graph():
            inputs = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if inputs:  # mode "any": the hook keeps no gradients waiting for the others
                register_multi_grad_hook(inputs, lambda _: self._leave_backward(name), mode="any")

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._forward:
            self._forward.pop()
        if _records_graph():
            name = self._name(module)
            outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs:
                register_multi_grad_hook(outputs, lambda _: self._enter_backward(name), mode="any")

    def _enter_backward(self, name: str) -> None:
        self._backward.append(name)
        if not self._reset_queued:
            self._reset_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _leave_backward(self, name: str) -> None:
        if name in self._backward:
            del self._backward[len(self._backward) - 1 - self._backward[::-1].index(name)]

    def _end_backward(self) -> None:
        self._backward.clear()
        self._reset_queued = False


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor holding memory on this rank: a DTensor's local shard (FSDP2), else itself."""
    local = getattr(tensor, "_local_tensor", None)
    return tensor if local is None else local


def _records_graph() -> bool:
    """A forward that backward will traverse: gradients on, and not a recompute inside backward
    (activation checkpointing), whose graph is consumed at once."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


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


def active_tracker() -> Tracker | None:
    """The innermost `Tracker` recording now, if any."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((m for m in reversed(_get_current_dispatch_mode_stack()) if isinstance(m, Tracker)), None)


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
