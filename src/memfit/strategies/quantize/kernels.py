"""Matmul paths for packed int8/int4 weights, and the nibble layouts int4 weights are held in.

PyTorch ships CPU kernels for weight-only quantized matmuls, ``torch._weight_int8pack_mm`` and
``torch._weight_int4pack_mm_for_cpu``, which take bf16 inputs. The path is chosen per call by the
number of rows (tokens), from the crossovers measured by benchmarks/packed_kernels.py on the demo model's
shapes (2-core AVX-512 CPU): the int8 kernel runs one row 3-4x faster than an fp32 ``F.linear`` but
512 rows about 1.2x slower than dequantize + ``F.linear``, so it serves up to `INT8_KERNEL_MAX_ROWS`
rows; the int4 kernel beats dequantizing at every row count measured (1 to 512), so it serves all
of them. Inputs are cast to bf16 for the kernels and the outputs back to the activation dtype.
At up to `native.MAX_ROWS` rows (decode), memfit's own kernels (`native`, compiled for this CPU on
first use) take the place of both: they read the weights about twice as fast there.

The CPU int4 kernel reads weights in an ISA-specific blocked nibble layout (see
aten/src/ATen/native/cpu/int4mm_kernel.cpp). memfit packs that layout itself, checked once against
``torch._convert_weight_to_int4pack_for_cpu``, so it can also unpack it (for the dequantize path and
to save checkpoints in the portable plain layout).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from memfit import native

# Rows (tokens) up to which the packed CPU kernels beat dequantize + F.linear, measured by
# benchmarks/packed_kernels.py (docs/benchmarks.md): int8 crosses over between 64 and 512 rows; int4 never did.
INT8_KERNEL_MAX_ROWS = 64
INT4_KERNEL_MAX_ROWS = 1 << 62

# Group sizes the CPU int4 kernel accepts.
_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _kernel_ok(x: torch.Tensor, max_rows: int) -> bool:
    # Fake tensors on the CPU take the kernel path too (the kernels have meta implementations),
    # so predictions allocate what real runs allocate; meta tensors (device "meta") do not.
    return x.device.type == "cpu" and _rows(x) <= max_rows


# -- int8 ---------------------------------------------------------------------------------------
def int8_kernel_applies(x: torch.Tensor) -> bool:
    """True if `int8_linear` runs the packed int8 kernel for input ``x`` (few rows, on the CPU, and
    an input width that is a multiple of 16: with others, such as a low-rank factor's rank,
    ``torch._weight_int8pack_mm`` crashed the process on torch 2.13's CPU build)."""
    return x.shape[-1] % 16 == 0 and _kernel_ok(x, INT8_KERNEL_MAX_ROWS)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` for an int8 weight [N, K] with per-row scales [N]."""
    if native.applies(x) and scale.dtype == torch.bfloat16:
        out = native.gemv_int8(x.reshape(-1, x.shape[-1]), qweight, scale).reshape(*x.shape[:-1], qweight.shape[0])
    elif int8_kernel_applies(x):
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # x2: [M, K]
        out = torch._weight_int8pack_mm(x2, qweight, scale.to(torch.bfloat16))
        out = out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    else:
        out = F.linear(x, dequantize_int8(qweight, scale, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: ``x`` rounded to int8 per row (token) on the fly, times the int8 weight [N, K] in
    integer arithmetic (``torch._int_mm``, int32 accumulation), rescaled by both scales.

    Up to `INT8_KERNEL_MAX_ROWS` rows the weight-only kernel is faster (decode is bound by reading
    the weight, which both read as int8) and rounds only the weight, so those rows take it.
    """
    if x.device.type == "meta" or _rows(x) <= INT8_KERNEL_MAX_ROWS:
        return int8_linear(x, qweight, scale, bias)
    x2 = x.reshape(-1, x.shape[-1]).float()  # x2: [M, K]
    x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # [M, 1]
    xq = (x2 / x_scale).round_().to(torch.int8)
    out = torch._int_mm(xq, qweight.t()).float()  # [M, N] int32 -> fp32
    out = (out * x_scale * scale.float()).to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (or float8) [N, K] and scales [N] -> float [N, K] in ``dtype``."""
    if qweight.dtype == torch.int8 and scale.dtype == torch.bfloat16:
        fast = native.dequantize(native.NativeWeight(native.KIND_INT8, qweight, scale), dtype)
        if fast is not None:  # the same values, one pass (untraced, untracked runs)
            return fast
    return qweight.to(dtype) * scale.to(dtype)[:, None]


# -- float8 -------------------------------------------------------------------------------------
def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` for a float8 weight [N, K] with per-row scales [N].

    The CPU has no float8 arithmetic, so the weight is widened to the activation dtype for the
    matmul (the bytes held stay float8); PyTorch's float8 matmul (``torch._scaled_mm``) would also
    round the activations to float8.
    """
    out = F.linear(x, dequantize_int8(qweight, scale, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


# -- int4 layouts -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Int4Layout:
    """How 4-bit values of a weight [N, K] sit in a uint8 tensor [N, K // 2].

    ``block_n == 0`` is the plain layout: row-major, two neighbouring columns per byte (even
    column in the low nibble), the layout memfit saves. Otherwise rows go in blocks of
    ``block_n``; each block is stored k-major and each byte pairs row ``i`` (low nibble) with row
    ``i + block_n // 2`` (``half_pairs``) or ``i + 1``; a trailing partial block pairs neighbours.
    """

    block_n: int = 0
    half_pairs: bool = False

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Values 0..15 as integers [N, K] -> uint8 [N, K // 2] in this layout."""
        n, k = q.shape
        if q.is_meta:  # every layout holds two values per byte
            return torch.empty(n, k // 2, dtype=torch.uint8, device="meta")
        q = q.to(torch.uint8)
        if self.block_n == 0:
            return q[:, 0::2] | (q[:, 1::2] << 4)
        full = n // self.block_n * self.block_n
        parts = []
        if full:
            blocks = q[:full].reshape(-1, self.block_n, k).transpose(1, 2)  # [NB, K, B]
            lo, hi = self._split(blocks, self.half_pairs)
            parts.append((lo | (hi << 4)).reshape(-1))
        if full < n:
            lo, hi = self._split(q[full:].t(), False)  # tail: [K, T]
            parts.append((lo | (hi << 4)).reshape(-1))
        return torch.cat(parts).view(n, k // 2)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 [N, K // 2] in this layout -> values 0..15 as uint8 [N, K]."""
        n, k = packed.shape[0], packed.shape[1] * 2
        if self.block_n == 0:
            return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, k)
        flat = packed.reshape(-1)
        full = n // self.block_n * self.block_n
        rows = []
        if full:
            blocks = flat[: full * k // 2].reshape(-1, k, self.block_n // 2)
            merged = self._merge(blocks & 15, blocks >> 4, self.half_pairs)  # [NB, K, B]
            rows.append(merged.transpose(1, 2).reshape(full, k))
        if full < n:
            tail = flat[full * k // 2 :].reshape(k, (n - full) // 2)
            rows.append(self._merge(tail & 15, tail >> 4, False).t())
        return torch.cat(rows) if len(rows) > 1 else rows[0].contiguous()

    @staticmethod
    def _split(x: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[-1]
        return (x[..., : b // 2], x[..., b // 2 :]) if half else (x[..., 0::2], x[..., 1::2])

    @staticmethod
    def _merge(lo: torch.Tensor, hi: torch.Tensor, half: bool) -> torch.Tensor:
        if half:
            return torch.cat([lo, hi], dim=-1)
        return torch.stack([lo, hi], dim=-1).reshape(*lo.shape[:-1], lo.shape[-1] * 2)


PLAIN = Int4Layout()
NATIVE_INT4_LAYOUT = Int4Layout(block_n=64, half_pairs=True)  # the blocked layout native.gemv_int4 reads
NATIVE_INT4_LAYOUTS = (PLAIN, NATIVE_INT4_LAYOUT)  # the layouts native.gemv_int4 reads


@functools.lru_cache(maxsize=1)
def cpu_int4_layout() -> Int4Layout | None:
    """The layout ``torch._weight_int4pack_mm_for_cpu`` reads on this CPU, or None if unknown.

    Probes the converter once with a shape that has full blocks and a partial one, and returns
    the candidate layout that reproduces it exactly.
    """
    convert = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return None
    # a property of the machine, not of the run: outside any tracker or fake-tensor mode
    with _disable_current_modes():
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (144, 64), dtype=torch.int32, generator=gen)  # 144 = 2*64 + 16
        try:
            reference = convert(q, 2)
        except RuntimeError:
            return None
        for layout in (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False)):
            if torch.equal(layout.pack(q), reference):
                return layout
    return None


def int4_layout_for(out_features: int, in_features: int, group_size: int) -> Int4Layout:
    """The layout to hold a weight in: the CPU kernel's when the kernel can run it, else plain."""
    layout = cpu_int4_layout()
    ok = (
        layout is not None
        and out_features % 16 == 0
        and group_size in _KERNEL_GROUP_SIZES
        and in_features % group_size == 0
    )
    return layout if ok else PLAIN


# -- int4 ---------------------------------------------------------------------------------------
def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    layout: Int4Layout,
    bias: torch.Tensor | None,
    scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W[n, k] = (q[n, k] - zero_point[g, n]) * scale[g, n]``, ``g = k // group_size``.

    Args:
        qweight: uint8 [N, K // 2] in ``layout``.
        scale: bf16 [G, N] with ``G = ceil(K / group_size)`` (the last group may be short).
        zero_point: uint8 [G, N], values 0..15.
        scale_zero: `int4_scale_zero` of the two, if computed once beforehand.
    """
    k = qweight.shape[1] * 2
    # The int4 kernel has no derivative: inputs that need a gradient take the dequantize path.
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    kind = native.KIND_INT4_PLAIN if layout == PLAIN else native.KIND_INT4_BLOCKED
    if (layout in NATIVE_INT4_LAYOUTS and scale.dtype == torch.bfloat16
            and native.weight_supported(kind, qweight.shape[0], k, group_size) and native.applies(x)):
        out = native.gemv_int4(x.reshape(-1, k), qweight, scale, zero_point, group_size, layout != PLAIN)
        out = out.reshape(*x.shape[:-1], qweight.shape[0])
    elif layout != PLAIN and not needs_grad and _kernel_ok(x, INT4_KERNEL_MAX_ROWS):
        if scale_zero is None:
            scale_zero = int4_scale_zero(scale, zero_point)
        x2 = x.reshape(-1, k).to(torch.bfloat16)  # x2: [M, K]
        out = torch._weight_int4pack_mm_for_cpu(x2, qweight, group_size, scale_zero)
        out = out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    else:
        out = F.linear(x, dequantize_int4(qweight, scale, zero_point, group_size, layout, x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def int4_scale_zero(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The CPU int4 kernel's operand [G, N, 2] bf16: it computes (q - 8) * s + z, so its float
    zero is z = (8 - zero_point) * s."""
    s = scale.float()
    return torch.stack([s, (8 - zero_point.float()) * s], dim=-1).to(torch.bfloat16)


def dequantize_int4(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    layout: Int4Layout,
    dtype: torch.dtype,
) -> torch.Tensor:
    """uint8 [N, K // 2] + scales and zero points [G, N] -> float [N, K] in ``dtype``."""
    kind = {PLAIN: native.KIND_INT4_PLAIN, NATIVE_INT4_LAYOUT: native.KIND_INT4_BLOCKED}.get(layout)
    if kind is not None and scale.dtype == torch.bfloat16 and zero_point.dtype == torch.uint8:
        fast = native.dequantize(native.NativeWeight(kind, qweight, scale, zero_point, group_size), dtype)
        if fast is not None:  # the same values, one pass (untraced, untracked runs)
            return fast
    q = layout.unpack(qweight)  # [N, K]
    k = q.shape[1]
    expand = lambda t: t.t().repeat_interleave(group_size, dim=1)[:, :k]  # [G, N] -> [N, K]
    return (q.to(dtype) - expand(zero_point).to(dtype)) * expand(scale).to(dtype)
