"""The rounding arithmetic of memfit's weight formats: the grids weights are rounded to.

- int8 per row, symmetric (`quantize_int8_rows`);
- 4-bit in groups of input columns, asymmetric with an integer zero point and a least-squares
  fitted scale (`quantize_int4_groups`);
- float8 (e4m3) per row (`quantize_fp8_rows`).

Scales are rounded to their stored dtype before the weights are rounded against them, so a stored
(codes, scale) pair reproduces exactly the grid the weights were rounded to.
"""

from __future__ import annotations

import math

import torch

from memfit.memory.fake import shape_determined

CHUNK_VALUES = 1 << 22  # rows are rounded in chunks of about this many values (16 MB of fp32)

def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: weight [N, K] -> (int8 [N, K], bf16 scales [N])."""
    return _per_row(weight, torch.int8, 127.0, lambda x: x.round().clamp(-127, 127))


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 (e4m3) per row: weight [N, K] -> (float8_e4m3fn [N, K], bf16 scales [N]).

    Each row is scaled so its largest magnitude lands on 448, the format's largest finite value;
    the cast to float8 then rounds to nearest (3 mantissa bits: a relative step at every
    magnitude, where int8's step is uniform).
    """
    return _per_row(weight, torch.float8_e4m3fn, FP8_MAX, lambda x: x.clamp(-FP8_MAX, FP8_MAX))


def _per_row(weight: torch.Tensor, dtype: torch.dtype, top: float, round_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``weight`` so its absmax maps to ``top``, round with ``round_fn`` and cast
    to ``dtype``; rows go in chunks so the float temporaries stay bounded on large weights."""
    weight = weight.detach()
    rows = max(1, CHUNK_VALUES // max(1, weight.shape[1]))
    q = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].float()
        absmax = w.abs().amax(dim=1)
        scale[start : start + rows] = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
        q[start : start + rows] = round_fn(w / scale[start : start + rows].float()[:, None]).to(dtype)
    return q, scale


@shape_determined
def quantize_int4_groups(
    weight: torch.Tensor, group_size: int, *, shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8), refits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of input columns, with a least-squares fit of each group's grid.

    ``W ~ (q - zero_point) * scale`` with q and the integer zero point in 0..15. For each group, a
    few clipping ranges (the min-max range shrunk by ``shrink``) seed the grid; each is refined by
    ``refits`` rounds of rounding and a least-squares refit of the scale (as llama.cpp's k-quants
    do), and the grid with the lowest squared error wins. No calibration data is used. When
    ``group_size`` does not divide K the last group is shorter.

    Returns:
        (values 0..15 as uint8 [N, K], bf16 scales [G, N], uint8 zero points [G, N]).
    """
    n, k = weight.shape
    num_groups = math.ceil(k / group_size)
    if weight.is_meta:  # no values: the shapes alone (rebuilding a saved model, byte estimates)
        meta = dict(device="meta")
        return (torch.empty(n, k, dtype=torch.uint8, **meta), torch.empty(num_groups, n, dtype=torch.bfloat16, **meta),
                torch.empty(num_groups, n, dtype=torch.uint8, **meta))
    w = weight.detach().float()
    pad = num_groups * group_size - k
    if pad:  # padded columns repeat the last one and get zero weight in the fit
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    x = w.view(n, num_groups, group_size)  # [N, G, group]
    mask = torch.ones(num_groups * group_size, device=w.device)
    mask[k:] = 0
    mask = mask.view(num_groups, group_size)
    low, high = x.amin(dim=-1), x.amax(dim=-1)  # [N, G]
    best_err = best_scale = best_zero = None
    for factor in shrink:
        mid, half = (low + high) / 2, (high - low) / 2 * factor
        scale = (2 * half / 15).clamp(min=1e-10)
        zero = (-(mid - half) / scale).round().clamp(0, 15)
        for _ in range(refits):
            d = (_round_int4(x, scale, zero) - zero[..., None]) * mask  # [N, G, group]
            num, den = (d * x).sum(-1), (d * d).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-12), scale).clamp(min=1e-10)
        err = ((((_round_int4(x, scale, zero) - zero[..., None]) * scale[..., None]) - x) ** 2 * mask).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    scale = best_scale.to(torch.bfloat16)  # round the scale first, then the weights against it
    q = _round_int4(x, scale.float(), best_zero).to(torch.uint8).view(n, num_groups * group_size)[:, :k]
    return q, scale.t().contiguous(), best_zero.to(torch.uint8).t().contiguous()


def _round_int4(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return ((x / scale[..., None]).round() + zero[..., None]).clamp(0, 15)


def int4_group_size(in_features: int, group_size: int) -> int:
    """The group size a layer gets: ``group_size``, or when it does not divide ``in_features``
    (576 = 4.5 x 128), the largest power of two below it that does, if at least 32; otherwise
    ``group_size`` with a shorter last group."""
    size = group_size
    while in_features % size and size > 32:
        size //= 2
    return size if in_features % size == 0 else group_size




def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` [N, K] rounded to 4-bit groups (min-max grid) and back to fp32: a fast stand-in
    for the fitted grid where only the size of the rounding error matters (AWQ's scale search,
    sensitivity runs)."""
    size = int4_group_size(weight.shape[1], group_size)
    q, scale, zero = quantize_int4_groups(weight, size, shrink=(1.0,), refits=0)
    columns = torch.arange(weight.shape[1], device=weight.device) // size
    return (q.float() - zero.float().t()[:, columns]) * scale.float().t()[:, columns]


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] rounded to int8 per row and back to fp32."""
    q, scale = quantize_int8_rows(weight)
    return q.float() * scale.float()[:, None]
