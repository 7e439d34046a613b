"""The process's resident memory: now, and the peak over a stretch of code.

`RssWatch` resets the kernel's high-water mark (``VmHWM``) at entry by writing ``5`` to
``/proc/self/clear_refs`` (Linux), so the peak it reports belongs to the ``with`` block alone.
Where that is not possible (other systems, restricted containers) it falls back to
``getrusage``'s lifetime peak, and says so through `RssWatch.exact`.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import sys
from pathlib import Path
from typing import Any

from torch import nn

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Resident memory now (``VmRSS``); the lifetime peak where ``/proc`` is not available."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else lifetime_peak_rss_bytes()


_hwm_reset = False  # whether an RssWatch reset the kernel's high-water mark in this process


def lifetime_peak_rss_bytes() -> int:
    """The process's peak resident set size so far.

    On Linux the kernel's high-water mark (``VmHWM``), unless an `RssWatch` has reset it: then
    ``ru_maxrss``. Not ``ru_maxrss`` first, because Linux carries it across ``exec``: a process
    started by a larger one (a benchmark's child) reported its parent's peak as its own.
    """
    kib = None if _hwm_reset else _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class RssWatch:
    """Resident memory at entry and its peak until exit.

    Attributes:
        start_bytes: resident bytes at entry.
        peak_bytes: the highest resident bytes inside the block (after exit).
        exact: False when the peak is the process's lifetime peak (the high-water mark could not
            be reset), which can predate the block.

    Example:
        >>> with RssWatch() as watch:
        ...     run()
        >>> watch.growth_bytes
    """

    def __enter__(self) -> RssWatch:
        global _hwm_reset
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _hwm_reset = True
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        self.start_bytes = rss_bytes()
        self.peak_bytes = self.start_bytes
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _status_kib("VmHWM") if self.exact else None
        self.peak_bytes = hwm * 1024 if hwm is not None else lifetime_peak_rss_bytes()

    @property
    def growth_bytes(self) -> int:
        """How far resident memory rose above its level at entry."""
        return max(self.peak_bytes - self.start_bytes, 0)


def make_resident(model: nn.Module) -> None:
    """Read one value per memory page of every parameter and buffer of ``model``.

    Weights loaded from safetensors can be memory-mapped views of the file, resident only once
    touched; touching them first keeps their paging-in out of a later RSS measurement.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        flat[:: max(1, 4096 // tensor.element_size())].float().sum()


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def return_freed_memory(threshold_bytes: int = 64 * 1024) -> bool:
    """Make glibc give memory back to the system when it is freed, for the rest of the process.

    By default glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so later
    tensors come from the heap and freed ones stay resident: RSS then tracks the allocator's
    history, not live tensors. A fixed threshold (which also turns the adjustment off) maps every
    block above it separately and unmaps it on free. ``memfit profile`` sets it so RSS can be
    compared with the tracked bytes. Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
        return bool(mmap_set and libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def trim_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the system now (glibc's ``malloc_trim``).

    For a phase that frees many mid-sized temporaries among blocks that stay (a layout conversion
    on load): the holes they leave stay resident otherwise. Does nothing where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
