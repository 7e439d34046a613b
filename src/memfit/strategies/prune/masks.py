"""Which weights a layer keeps: scores (magnitude, Wanda) and the choice within each output row
or within each group of M consecutive inputs (N:M).

Every row keeps the same number of weights, which is what lets `SparseLinear` hold the kept
values as a dense matrix and lets the estimator know the bytes from shapes alone. Wanda compares
within rows by design (Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", 2023, found per-output comparison better than per-layer for LLMs); magnitude pruning
uses the same rows.
"""

from __future__ import annotations

import torch


def kept_per_row(in_features: int, sparsity: int, group: int = 0) -> int:
    """Weights each row keeps: ``sparsity`` percent pruned (rounded half up), or with N:M groups of
    ``group`` inputs, N per full group and every weight of a trailing partial group."""
    if group:
        full, rest = divmod(in_features, group)
        return full * (group - pruned_count(group, sparsity)) + rest
    return in_features - pruned_count(in_features, sparsity)


def pruned_count(size: int, sparsity: int) -> int:
    """``sparsity`` percent of ``size``, rounded half up."""
    return (size * sparsity + 50) // 100


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the smallest weights matter least."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_square_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: a weight matters as much as it is large times how large its input is
    (``input_square_sums`` [K] is the sum of x_j^2 over the calibration tokens)."""
    return weight.detach().float().abs() * input_square_sums.float().sqrt()[None, :]


def keep_mask(scores: torch.Tensor, sparsity: int, group: int = 0) -> torch.Tensor:
    """bool [N, K], True for the weights kept: in each row the ``sparsity`` percent with the
    lowest scores are pruned; with ``group`` (N:M), that share of each group of ``group``
    consecutive columns."""
    n, k = scores.shape
    keep = torch.ones(n, k, dtype=torch.bool, device=scores.device)
    if group:
        full = k // group * group
        grouped = scores[:, :full].reshape(n, -1, group)  # [N, K / M, M]
        lowest = grouped.topk(pruned_count(group, sparsity), dim=-1, largest=False).indices
        keep[:, :full] = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, lowest, False).view(n, full)
    else:
        keep = drop_lowest(scores, pruned_count(k, sparsity))
    return keep


def drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of ``scores`` [N, K] keeping all but the ``count`` lowest of each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        keep.scatter_(1, scores.topk(count, dim=1, largest=False).indices, False)
    return keep
