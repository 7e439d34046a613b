"""The runtime's static KV cache, in the model's dtype or quantized (``kv-int8``, ``kv-int4``).

`KVCache` holds every layer's keys and values at full length, written in place at their columns.
A quantized cache keeps each layer's keys and values as integer codes plus fp16 scales
(`cache_bytes_per_layer` counts them):

- ``kv-int8``: keys and values per token and key-value head (`TokenQuantized`), symmetric,
  ``x = code * scale``, codes in [-127, 127], one scale per ``head_dim`` values: ``D + 2`` bytes
  per ``D`` values, 0.516x an fp16 cache at ``D = 64``.
- ``kv-int4`` (KIVI's split): values per token (`TokenQuantized`: an fp16 scale and a uint8 zero
  point per ``head_dim`` values), keys per channel over groups of `GROUP` columns
  (`ChannelQuantized`: an fp16 scale and offset per channel and group; keys have a few large
  channels, which per-token groups would let swamp the rest), asymmetric over each group's
  min-max range, codes in [0, 15] two a byte. The newest group of keys waits in an int8 residual
  until it is whole. 0.297x fp16 at 2,048 columns and ``D = 64``; the residual's fixed 2 KiB per
  head and layer makes it more at short lengths (0.31x at 512).

Attention reads the whole layer dequantized, in expressions the compiler fuses into one pass
over the codes (for int8 into attention's products and sums themselves, with no float copy).
"""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch._subclasses.fake_tensor import FakeTensor

from memfit.errors import RecipeError

SCALE_DTYPE = torch.float16


class KVFormat(enum.Enum):
    """How a quantized cache stores keys and values (``kv-int8``, ``kv-int4`` in recipes)."""

    INT8 = "int8"
    INT4 = "int4"

    @property
    def token(self) -> str:
        return f"kv-{self.value}"


GROUP = 32  # columns per group of a kv-int4 cache's keys (a scale and offset per channel and group)


def quantize(x: torch.Tensor, format: KVFormat) -> tuple[torch.Tensor, ...]:
    """Codes and scales of ``x`` [..., N], one group per vector of its last dimension.

    ``int8``: symmetric, ``x = code * scale``: ``(codes [..., N] int8 in [-127, 127], scales [..., 1]
    fp16)``. ``int4``: asymmetric over the group's min-max range widened to hold 0, ``x = (code - zero) * scale``:
    ``(codes [..., N / 2] uint8, two in [0, 15] a byte with the first half of the group in the low
    nibbles, scales [..., 1] fp16, zeros [..., 1] uint8)``. Scales are rounded to fp16 before the
    codes are computed, so `dequantize` gives back what the codes were chosen against.
    """
    x = x.float()
    tiny = torch.finfo(SCALE_DTYPE).tiny
    if format is KVFormat.INT8:
        scale = (x.abs().amax(-1, keepdim=True) / 127).to(SCALE_DTYPE)
        return (x / scale.float().clamp(min=tiny)).round().clamp(-127, 127).to(torch.int8), scale
    # the range holds 0, so the zero point is one of the 16 codes (a group of one sign, rare in
    # values, gives up a little of its resolution)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 15).to(SCALE_DTYPE)
    safe = scale.float().clamp(min=tiny)
    zero = (-low / safe).round().clamp(0, 15)
    codes = (x / safe + zero).round().clamp(0, 15).to(torch.uint8)
    return _pack(codes), scale, zero.to(torch.uint8)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    # float arithmetic and a concatenation of halves, which the compiler vectorizes and fuses into the
    # consumer (on the demo's cache 2x faster than shifts and masks, 3x than interleaved nibbles)
    whole = codes.float()
    high = torch.floor(whole * (1 / 16))
    return torch.cat((whole - 16 * high, high), -1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, format: KVFormat, dtype: torch.dtype,
               zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The values `quantize` gave ``codes``, ``scales`` (and, for int4, ``zeros``) for, in ``dtype``."""
    if format is KVFormat.INT8:
        return (codes.float() * scales.float()).to(dtype)
    return ((_unpack(codes) - zeros.float()) * scales.float()).to(dtype)


class TokenQuantized:
    """One layer's keys or values, quantized per token and key-value head over ``head_dim``: int8
    codes [B, KV, L, D] and scales [B, KV, L, 1]; or int4 codes [B, KV, L, D / 2] (two a byte),
    fp16 scales and uint8 zero points [B, KV, L, 1] (see `quantize`)."""

    def __init__(self, format: KVFormat, shape: tuple[int, int, int, int], device) -> None:
        b, kv, length, d = shape
        self.format, self.length = format, length
        width = d if format is KVFormat.INT8 else d // 2
        self.codes = torch.zeros(b, kv, length, width, dtype=torch.int8 if width == d else torch.uint8, device=device)
        self.scales = torch.zeros(b, kv, length, 1, dtype=SCALE_DTYPE, device=device)
        self.zeros = None if format is KVFormat.INT8 else torch.zeros(b, kv, length, 1, dtype=torch.uint8,
                                                                      device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales] + ([] if self.zeros is None else [self.zeros])

    def write(self, columns: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize ``x`` [B, KV, T, D] into columns ``columns`` [T]."""
        for store, new in zip(self.tensors(), quantize(x, self.format), strict=True):
            store.index_copy_(2, columns, new)

    def read(self, dtype: torch.dtype, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Every column dequantized, [B, KV, L, D] in ``dtype``."""
        return dequantize(self.codes, self.scales, self.format, dtype, self.zeros)


class ChannelQuantized:
    """One layer's keys in 4 bits, quantized per channel over groups of `GROUP` columns (KIVI's keys:
    a few channels of keys are much larger than the rest, so per-token groups lose the small ones).

    Codes are stored by column like `TokenQuantized`'s, [B, KV, L, D / 2] uint8; scales and offsets
    per group and channel, [B, KV, groups, 2, D] fp16. A group is quantized again at each write
    into it, from ``residual`` (an int8 per-token copy of the newest group), and its columns are
    read from the residual while it is the newest: the codes of a group count once it is whole.
    """

    def __init__(self, shape: tuple[int, int, int, int], device) -> None:
        b, kv, length, d = shape
        self.length, groups = length, -(-length // GROUP)
        self.codes = torch.zeros(b, kv, groups * GROUP, d // 2, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(b, kv, groups, 2, d, dtype=SCALE_DTYPE, device=device)
        self.residual = TokenQuantized(KVFormat.INT8, (b, kv, GROUP, d), device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, *self.residual.tensors()]

    def write(self, columns: torch.Tensor, x: torch.Tensor) -> None:
        """Write ``x`` [B, KV, T, D] at consecutive ``columns`` [T]; several columns at once must
        start a group (the runtime's prefills start at column 0, `runtime_perplexity`'s chunks at
        multiples of their length)."""
        t = x.shape[2]
        if t > 1 and not isinstance(columns, FakeTensor) and int(columns[0]) % GROUP:
            raise ValueError(f"a kv-int4 write of {t} columns starts at column {int(columns[0])}, "
                             f"not at a multiple of {GROUP}")
        whole = t // GROUP * GROUP if t > 1 else 0
        if whole:  # whole groups, quantized straight from x
            self._store(columns[:whole], x[:, :, :whole])
        # the last group written (whole or not) goes to the residual, where it is read from while it
        # is the newest; a group written in part is quantized from the residual, stale columns and all
        last = (t - 1) // GROUP * GROUP if t > 1 else 0
        self.residual.write(columns[last:] % GROUP, x[:, :, last:])
        if whole != t:
            start = columns[-1:] // GROUP * GROUP
            self._store(start + torch.arange(GROUP, device=x.device), self.residual.read(torch.float32))

    def _store(self, columns: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize whole groups ``x`` [B, KV, n * GROUP, D] at ``columns`` (starting a group)."""
        b, kv, t, d = x.shape
        groups = x.float().reshape(b, kv, t // GROUP, GROUP, d)
        low, high = groups.amin(3), groups.amax(3)  # [B, KV, n, D]
        scale, offset = ((high - low) / 15).to(SCALE_DTYPE), low.to(SCALE_DTYPE)
        codes = ((groups - offset[:, :, :, None].float()) / scale[:, :, :, None].float().clamp(
            min=torch.finfo(SCALE_DTYPE).tiny)).round().clamp(0, 15).to(torch.uint8)
        self.codes.index_copy_(2, columns, _pack(codes.reshape(b, kv, t, d)))
        self.scales.index_copy_(2, columns[::GROUP] // GROUP, torch.stack((scale, offset), -2))

    def read(self, dtype: torch.dtype, columns: torch.Tensor) -> torch.Tensor:
        """Every column dequantized, [B, KV, L, D] in ``dtype``; the group of the last of ``columns``
        (the newest written) from the residual. One pass: unpack, scale (gathered per group) and
        the residual's columns chosen by a mask, all broadcast, which the compiler fuses."""
        b, kv, rows, half = self.codes.shape
        groups = rows // GROUP
        unpacked = _unpack(self.codes).view(b, kv, groups, GROUP, 2 * half)
        scales = self.scales[:, :, :, None].float()  # [B, KV, groups, 1, 2, D]: broadcast, not gathered
        stored = unpacked * scales[..., 0, :] + scales[..., 1, :]
        newest = (torch.arange(groups, device=unpacked.device) == columns[-1] // GROUP)[:, None, None]
        out = torch.where(newest, self.residual.read(torch.float32)[:, :, None], stored)
        return out.reshape(b, kv, rows, 2 * half)[:, :, : self.length].to(dtype)


def cache_bytes_per_layer(format: KVFormat | None, batch: int, kv_heads: int, length: int, head_dim: int,
                          element_size: int = 2) -> int:
    """Bytes one layer's keys and values hold (codes, scales and residual) at ``length`` columns."""
    heads = batch * kv_heads
    if format is None:
        return 2 * heads * length * head_dim * element_size
    if format is KVFormat.INT8:
        return 2 * heads * length * (head_dim + 2)
    groups = -(-length // GROUP)
    keys = groups * head_dim * (GROUP // 2 + 4) + GROUP * (head_dim + 2)
    values = length * (head_dim // 2 + 3)
    return heads * (keys + values)


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, preallocated: ``keys[i]``, ``values[i]`` are [B, KV, L, D]
    tensors, or (with a ``format``) `TokenQuantized` / `ChannelQuantized` stores of that shape.

    ``L`` (`max_len`) bounds prompt plus new tokens; columns are written in place, never reallocated.
    """

    keys: list
    values: list
    format: KVFormat | None = None

    @classmethod
    def allocate(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 format: KVFormat | None = None) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        if format is not None and head_dim % 2:
            raise RecipeError(f"a quantized KV cache packs two values a byte; head_dim {head_dim} is odd",
                              "run without kv-int8/kv-int4")
        if format is None:
            keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        else:
            keys = [TokenQuantized(format, shape, device) if format is KVFormat.INT8 else
                    ChannelQuantized(shape, device) for _ in range(layers)]
            values = [TokenQuantized(format, shape, device) for _ in range(layers)]
        cache = cls(keys=keys, values=values, format=format)
        if torch.device(device).type == "cuda":  # CUDA graphs may then write into them in place
            for tensor in cache.tensors():
                torch._dynamo.mark_static_address(tensor)
        return cache

    @property
    def max_len(self) -> int:
        return self.values[0].shape[2] if self.format is None else self.values[0].length

    @property
    def batch(self) -> int:
        return self.values[0].shape[0] if self.format is None else self.values[0].codes.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        if self.format is None:
            return [*self.keys, *self.values]
        return [t for store in (*self.keys, *self.values) for t in store.tensors()]


def write(store, columns: torch.Tensor, x: torch.Tensor) -> None:
    """Write ``x`` [B, KV, T, D] into a layer's keys or values at consecutive ``columns`` [T]."""
    if isinstance(store, torch.Tensor):
        store.index_copy_(2, columns, x.to(store.dtype))  # a no-op cast unless autocast changed the dtypes
    else:
        store.write(columns, x)


def read(store, dtype: torch.dtype, columns: torch.Tensor) -> torch.Tensor:
    """A layer's keys or values, every column, as a tensor (dequantized into ``dtype`` if quantized;
    ``columns``: those just written)."""
    return store if isinstance(store, torch.Tensor) else store.read(dtype, columns)
