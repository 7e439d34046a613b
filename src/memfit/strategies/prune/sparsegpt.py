"""SparseGPT: prune a weight matrix column block by column block, choosing the weights to drop by
their second-order cost and moving each dropped weight's error onto the columns not yet visited.

Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023). With H = 2 X^T X / rows of the layer's calibration inputs and its inverse's upper Cholesky
factor U, removing w_ij costs about w_ij^2 / U_jj^2; within each block of columns the cheapest
weights of each row are dropped (every row keeps the same number, as `SparseLinear` stores it),
and for N:M the cheapest of each group of M, chosen when the loop reaches the group so the choice
sees the updates made so far. The kept weights are updated as GPTQ updates rounded ones.
"""

from __future__ import annotations

import torch

from memfit.memory.fake import shape_determined
from memfit.strategies.prune.masks import drop_lowest, keep_mask, pruned_count
from memfit.strategies.quantize.gptq import GptqSettings, upper_cholesky_of_inverse


@shape_determined
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: int,
    group: int = 0,
    settings: GptqSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [N, K] to ``sparsity`` percent per row (or N:M in groups of ``group``).

    Args:
        hessian: [K, K], proportional to X^T X of the layer's calibration inputs.
        sparsity: percent of each row's weights removed (of each group's, with ``group``).
        group: M of N:M sparsity, a divisor of ``settings.block``; 0 for unstructured.
        settings: block size and damping (GPTQ's defaults when None).

    Returns:
        ``(pruned, keep)``: the updated weight in fp32 with zeros where pruned, and the bool
        [N, K] mask of the kept weights.
    """
    settings = settings or GptqSettings()
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    if group and settings.block % group:
        raise ValueError(f"N:M groups of {group} must divide the block of {settings.block} columns")
    dead = torch.diagonal(h) == 0
    torch.diagonal(h).masked_fill_(dead, 1)
    w.masked_fill_(dead, 0)
    torch.diagonal(h).add_(settings.damp * torch.diagonal(h).mean())
    hinv = upper_cholesky_of_inverse(h)
    del h
    keep = torch.ones(n, k, dtype=torch.bool)
    target = pruned_count(k, sparsity)  # weights pruned per row, shared out over the blocks
    for start in range(0, k, settings.block):
        end = min(start + settings.block, k)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        cost_scale = torch.diagonal(hinv_block)[None, :] ** 2
        block_keep = keep[:, start:end]
        if not group:
            count = target * end // k - target * start // k
            block_keep[:] = drop_lowest(w_block**2 / cost_scale, count)
        for i in range(end - start):
            if group and i % group == 0 and start + i + group <= k:
                costs = w_block[:, i : i + group] ** 2 / cost_scale[:, i : i + group]
                block_keep[:, i : i + group] = keep_mask(costs, sparsity, group)
            _prune_column(w_block, errors, block_keep, hinv_block, i)
        w[:, start:end] = w_block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w, keep



@shape_determined  # the same shapes for the same column of every block: a prediction replays them
def _prune_column(
    w_block: torch.Tensor, errors: torch.Tensor, block_keep: torch.Tensor, hinv_block: torch.Tensor, i: int
) -> None:
    """Zero the pruned weights of column ``i`` of the block, record the error and push it onto the
    block's columns after it."""
    column = w_block[:, i]
    kept = torch.where(block_keep[:, i], column, torch.zeros_like(column))
    error = (column - kept) / hinv_block[i, i]
    w_block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
    w_block[:, i] = kept
    errors[:, i] = error
