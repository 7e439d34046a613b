"""Streamed decoder layers: their weights read from the model's file each time a forward reaches them.

A model larger than the memory it may use keeps some decoder layers where they are stored (the
safetensors file) and reads them at every forward (`memfit.offload` decides which). A streamed
layer is read in five units, in the order a forward uses them: attention inputs (input norm, q,
k, v), attention output (o, post-attention norm), gate, up, down. Units land in one ring buffer;
the layer's tensors are views into it, re-pointed each time a unit is acquired.

Units are read with ``pread`` (``native/stream.c``): ahead, by a C thread, while the current ones
compute, as far as the ring has room; or, with ``ahead=0``, by the consumer when it needs one (the
decode step's threads together; the Python forward alone). The decode step in C and the Python
forward (the prefill, the eager step) take units through the same acquire and release calls, in
the same order, so one reader serves both.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit import native
from memfit.errors import RecipeError
from memfit.models.arch import decoder_parts, layout_of
from memfit.runtime.decoder import GATED_MLPS, _plain_call

if TYPE_CHECKING:
    from memfit.io import StoredTensor

PARTS = ("attention in", "attention out", "gate", "up", "down")
ALIGN = 64
PAGE = 4096  # O_DIRECT's alignment: buffers, offsets and lengths in whole pages
GAP = 64 << 10  # O_DIRECT reads of tensors this close in the file are merged


def aligned(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclasses.dataclass
class _Slot:
    """One tensor of a unit: ``module.<attr>``, at ``offset`` bytes into the unit."""

    module: nn.Module
    attr: str
    offset: int
    stored: StoredTensor


@dataclasses.dataclass
class Unit:
    layer: int
    part: int  # index into PARTS
    nbytes: int
    slots: list[_Slot]
    pieces: list[tuple[int, int, int]]  # the reads that fill it: (file offset, bytes, offset in the unit)
    align: int = ALIGN  # the unit's place in the ring is a multiple of this


def _lay_out(tensors: list[StoredTensor], page_aligned: bool) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """``(each tensor's offset in its unit, the reads that fill the unit, the unit's bytes)``.

    By default the tensors follow each other, 64-byte aligned, one read each. ``page_aligned``
    lays a unit out for O_DIRECT reads, which bring whole pages from the disk straight into the
    ring: each tensor sits at its offset within a page of the file, and tensors at most `GAP`
    bytes apart in the file are one read (one disk request; the bytes between come too). Integer
    tensors at offsets that are not multiples of `ALIGN` in the file stay out of them: the packed
    CPU kernels' vector loads need them aligned (`memfit.io._read_tensors`), so they are read
    through the page cache to an aligned place after the rest.
    """
    offsets = [0] * len(tensors)
    direct = sorted((i for i, t in enumerate(tensors)
                     if page_aligned and (t.offset % ALIGN == 0 or t.dtype.is_floating_point)),
                    key=lambda i: tensors[i].offset)
    extents: list[list] = []  # [first file byte, end, members]
    for i in direct:
        t = tensors[i]
        if extents and t.offset - extents[-1][1] <= GAP:
            extents[-1][1] = max(extents[-1][1], t.offset + t.nbytes)
            extents[-1][2].append(i)
        else:
            extents.append([t.offset, t.offset + t.nbytes, [i]])
    pieces, end = [], 0
    for first, last, members in extents:
        start = aligned(end, PAGE) + first % PAGE
        for i in members:
            offsets[i] = start + tensors[i].offset - first
        pieces.append((first, last - first, start))
        end = aligned(start + last - first, PAGE)
    for i in sorted(set(range(len(tensors))) - set(direct)):
        offsets[i] = end
        pieces.append((tensors[i].offset, tensors[i].nbytes, end))
        end = aligned(end + tensors[i].nbytes)
    return offsets, pieces, end


def _unit_modules(layer: nn.Module, names) -> list[list[tuple[str, nn.Module]]]:
    """The modules of each unit of ``layer``, by attribute path, in `PARTS` order."""
    block, mlp = getattr(layer, names.attention), getattr(layer, names.mlp)
    return [
        [(names.input_norm, getattr(layer, names.input_norm)), *[(f"{names.attention}.{a}", getattr(block, a))
                                                                for a in (names.q, names.k, names.v)]],
        [(f"{names.attention}.{names.o}", getattr(block, names.o)),
         (names.post_attention_norm, getattr(layer, names.post_attention_norm))],
        [(f"{names.mlp}.{names.gate}", getattr(mlp, names.gate))],
        [(f"{names.mlp}.{names.up}", getattr(mlp, names.up))],
        [(f"{names.mlp}.{names.down}", getattr(mlp, names.down))],
    ]


def layer_units(model: nn.Module, index: int, stored: dict[str, StoredTensor],
                page_aligned: bool = False) -> list[Unit]:
    """The units of decoder layer ``index`` with their tensors' places in the file (laid out for
    O_DIRECT reads with ``page_aligned``: see `_lay_out`).

    Raises:
        RecipeError: the layer holds tensors outside the five units, or ones the file lacks.
    """
    parts = decoder_parts(model)
    prefix = f"{parts.layers_fqn}.{index}."
    layer = parts.layers[index]
    names = layout_of(model)
    mlp = getattr(layer, names.mlp)
    if type(mlp).__name__ not in GATED_MLPS or not _plain_call(mlp):
        raise RecipeError(f"layer {index}'s MLP is a {type(mlp).__name__}, which streaming does not read",
                          "run this model without --max-memory")
    units, covered = [], set()
    for part, modules in enumerate(_unit_modules(layer, names)):
        found = []
        for path, module in modules:
            for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or attr in module._non_persistent_buffers_set:
                    continue
                name = f"{prefix}{path}.{attr}"
                if name not in stored:
                    raise RecipeError(f"layer {index}'s {path}.{attr} is not in the model's files",
                                      "stream a model saved by memfit or a Hugging Face directory")
                found.append((module, attr, stored[name]))
                covered.add(name)
        offsets, pieces, nbytes = _lay_out([t for _, _, t in found], page_aligned)
        slots = [_Slot(module, attr, at, t) for (module, attr, t), at in zip(found, offsets, strict=True)]
        units.append(Unit(index, part, nbytes, slots, pieces, PAGE if page_aligned else ALIGN))
    extra = sorted(n for n in stored if n.startswith(prefix) and n not in covered)
    if extra:
        raise RecipeError(f"layer {index} holds tensors the streamed forward does not read ({extra[0]})",
                          "run this model without --max-memory")
    return units


def ring_minimum(units: list[Unit]) -> int:
    """The smallest ring the consumers cannot stall on: the most bytes held at once (both the
    decode step and the Python forward give each unit back before taking the next, except gate
    and up, which are held together), plus one unit's bytes lost where the ring wraps."""
    by_part = [max((u.nbytes for u in units if u.part == p), default=0) for p in range(len(PARTS))]
    a, b, g, u, d = by_part
    return max(a, b, g + u, d) + max(by_part) + max(u.align for u in units) * len(PARTS)


class StreamedWeights:
    """The streamed layers of a model: their units, the ring buffer, the reader.

    Args:
        units: every streamed layer's units, in layer order.
        capacity: the ring's bytes.
        ahead: units read ahead of the consumer by a background thread (0: none; the consumer reads).
        drop: drop each read's pages from the page cache after it (every pass reads the disk, as for
            a model larger than the machine's memory; the streamed file pushes no other file out).
            Units laid out for it (`layer_units`' ``page_aligned``) are then read with O_DIRECT: the
            disk writes into the ring, no core copies (where the file system refuses O_DIRECT, reads
            go through the page cache and drop their pages).
    """

    def __init__(self, units: list[Unit], capacity: int, ahead: int, drop: bool = False) -> None:
        lib = native.library()
        if lib is None:
            raise RecipeError("streaming weights needs memfit's C library, which could not be built",
                              "install a C compiler (cc), or run without --max-memory")
        self.units, self.ahead, self._lib = units, ahead, lib
        self.layers = sorted({u.layer for u in units})
        self._layer_set = set(self.layers)
        paths = {slot.stored.path for u in units for slot in u.slots}
        if len(paths) != 1:  # the reader has one file descriptor
            raise RecipeError("streaming reads one safetensors file; this model's layers are in several",
                              "save the model with memfit (one model.safetensors) and stream that")
        align = max(u.align for u in units)
        self._buffer = torch.empty(capacity + align - ALIGN, dtype=torch.uint8)  # 64-byte aligned already
        start = -self._buffer.data_ptr() % align
        self.ring = self._buffer[start:start + capacity]
        sizes = (ctypes.c_int64 * len(units))(*[u.nbytes for u in units])
        first, pieces = [0], []
        for unit in units:
            pieces.extend(unit.pieces)
            first.append(len(pieces))
        flat = (ctypes.c_int64 * (3 * len(pieces) + 1))(*[v for p in pieces for v in p])
        path = paths.pop()
        self._fd, self._direct_fd = os.open(path, os.O_RDONLY), -1
        if drop and align == PAGE:
            with contextlib.suppress(OSError):  # tmpfs and some others refuse O_DIRECT
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self._handle = lib.memfit_stream_open(self._fd, self.ring.data_ptr(), capacity, len(units), sizes,
                                              (ctypes.c_int64 * len(first))(*first), flat, ahead, int(drop),
                                              self._direct_fd, align)
        self.direct = self._direct_fd >= 0  # reads bypass the page cache
        if not self._handle:
            self.close()
            raise RecipeError("cannot start the weight reader", "run without --max-memory")
        self._cursor = 0
        self.bind_placeholders()

    @staticmethod
    def cached_fraction(units: list[Unit]) -> float:
        """The fraction of the streamed bytes' file span now in the page cache (-1 if unknown)."""
        lib = native.library()
        slots = [slot.stored for unit in units for slot in unit.slots]
        if lib is None or not slots or len({t.path for t in slots}) != 1:
            return -1.0
        first = min(t.offset for t in slots)
        last = max(t.offset + t.nbytes for t in slots)
        fd = os.open(slots[0].path, os.O_RDONLY)
        try:
            return float(lib.memfit_cached_fraction(fd, first, last - first))
        finally:
            os.close(fd)

    def streams(self, layer: int) -> bool:
        return layer in self._layer_set

    def bind_placeholders(self) -> None:
        """Point every streamed tensor at its offset in a unit placed at the ring's start (the
        decode step's table is built from these addresses: each is its unit-relative offset)."""
        for unit in self.units:
            self._bind(unit, 0)

    def unit_index(self, layer: int, part: int) -> int:
        return self.layers.index(layer) * len(PARTS) + part

    def _bind(self, unit: Unit, at: int) -> None:
        for slot in unit.slots:
            stored = slot.stored
            view = self.ring[at + slot.offset: at + slot.offset + stored.nbytes].view(stored.dtype).view(stored.shape)
            if slot.attr in slot.module._parameters:
                param = slot.module._parameters[slot.attr]
                if param.is_meta:
                    slot.module._parameters[slot.attr] = nn.Parameter(view, requires_grad=False)
                else:
                    param.data = view
            else:
                slot.module._buffers[slot.attr] = view

    def acquire(self, count: int = 1) -> None:
        """The next ``count`` units of the pass, read and bound to their modules."""
        for _ in range(count):
            at = self._lib.memfit_stream_acquire(self._handle)
            if at < 0:
                self.check()
            self._bind(self.units[self._cursor], at)
            self._cursor = (self._cursor + 1) % len(self.units)

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._lib.memfit_stream_release(self._handle)

    def start_pass(self) -> None:
        """Finish a pass that an exception cut short, so the next use starts at layer 0's units."""
        self._cursor = self._lib.memfit_stream_cursor(self._handle)
        while self._cursor:
            self.acquire()
            self.release()

    def _stats(self) -> tuple[float, float, float]:
        out = (ctypes.c_double * 3)()
        self._lib.memfit_stream_stats(self._handle, out)
        return out[0], out[1], out[2]

    def stats(self) -> tuple[int, float]:
        """(bytes read so far, seconds consumers waited for reads)."""
        read, waited, _ = self._stats()
        return int(read), waited

    def check(self) -> None:
        """Raise if the reader failed."""
        error = int(self._stats()[2])
        if error:
            raise OSError(error, f"reading streamed weights failed: {os.strerror(error)}")

    @property
    def handle(self) -> int:
        return self._handle

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.memfit_stream_close(handle)
        for attr in ("_fd", "_direct_fd"):
            fd = getattr(self, attr, -1)
            setattr(self, attr, -1)
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __del__(self) -> None:
        self.close()


