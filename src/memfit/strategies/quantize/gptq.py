"""GPTQ: round a weight matrix column by column, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). The grid (scale and zero point per row or per group) is fixed before the
loop from the original weights ("static groups"), so the result has exactly the layout of
round-to-nearest quantization and runs on the same kernels; with activation order the columns
are visited by decreasing Hessian diagonal, and each still uses its own group's grid.
"""

from __future__ import annotations

import dataclasses

import torch

from memfit.memory.fake import shape_determined, value_or


@dataclasses.dataclass(frozen=True)
class GptqSettings:
    """How GPTQ rounds.

    Args:
        block: columns updated together before the error is pushed to the rest (speed only).
        damp: fraction of the mean Hessian diagonal added to the diagonal (numerical stability).
        act_order: visit columns by decreasing Hessian diagonal (most active inputs first).
    """

    block: int = 128
    damp: float = 0.01
    act_order: bool = True


@shape_determined
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    qmin: int,
    qmax: int,
    settings: GptqSettings = GptqSettings(),
) -> torch.Tensor:
    """Integer codes for ``weight`` on a fixed grid, chosen by GPTQ.

    Args:
        weight: [N, K] float weights.
        hessian: [K, K], proportional to X^T X of the layer's calibration inputs.
        scale: [G, N] step of each group's grid (G = ceil(K / group_size); G = 1 per row).
        zero: [G, N] integer zero points (zeros for symmetric grids).
        group_size: input columns per grid.
        qmin, qmax: the code range (0..15 for 4-bit asymmetric, -127..127 for int8).

    Returns:
        [N, K] float tensor of integer codes in ``qmin..qmax``; ``(code - zero) * scale``
        reconstructs the weight.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    scale = scale.float()
    zero = zero.float()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their columns carry nothing
    torch.diagonal(h).masked_fill_(dead, 1)
    w.masked_fill_(dead, 0)
    order = torch.argsort(torch.diagonal(h), descending=True) if settings.act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    # the grid each visited column keeps (a prediction without values visits them in order)
    column_group = value_or(order // group_size, [j // group_size for j in range(k)])
    torch.diagonal(h).add_(settings.damp * torch.diagonal(h).mean())
    hinv = upper_cholesky_of_inverse(h)
    del h
    codes = torch.zeros_like(w)
    for start in range(0, k, settings.block):
        end = min(start + settings.block, k)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            g = column_group[start + i]
            _round_column(w_block, errors, codes[:, start + i], hinv_block, scale[g], zero[g], i, qmin, qmax)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes[:, torch.argsort(order)]


@shape_determined  # the same shapes for the same column of every block: a prediction replays them
def _round_column(
    w_block: torch.Tensor, errors: torch.Tensor, code_out: torch.Tensor, hinv_block: torch.Tensor,
    s: torch.Tensor, z: torch.Tensor, i: int, qmin: int, qmax: int,
) -> None:
    """Round column ``i`` of the block onto its grid (into ``code_out``), record its error and push
    the error onto the block's columns after it."""
    column = w_block[:, i]
    code = (column / s).round().add_(z).clamp_(qmin, qmax)
    code_out.copy_(code)
    error = (column - (code - z) * s) / hinv_block[i, i]
    w_block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
    errors[:, i] = error


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding more damping if H is not positive definite (``h`` is
    damped in place)."""
    extra = torch.diagonal(h).mean() * 0.01
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h)
        if value_or(info, 0) == 0:  # a prediction assumes the factorization succeeds
            inverse = torch.cholesky_inverse(lower)
            del lower
            return torch.linalg.cholesky(inverse, upper=True)
        torch.diagonal(h).add_(extra)
        extra *= 4
    raise ValueError("the calibration Hessian is not positive definite even after damping")
