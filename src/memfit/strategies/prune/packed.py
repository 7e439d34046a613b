"""`SparseLinear`: a pruned Linear that holds only its kept weights and a bitmask.

Every row keeps the same number of weights (the pruning methods choose within each output row,
or within each group of M for N:M), so the kept values form a dense [N, kept] matrix, held by a
child module ``values``. That child is a plain ``nn.Linear`` (never called: its weight is the
storage), so a quantization recipe after pruning (``prune-50-sparsegpt,int8``) replaces it with
an `Int8Linear` or `Int4Linear` like any other Linear, and both savings hold. The mask is one bit
per weight, eight to a byte along each row.

Held at 50% sparsity: half the values plus K/8 bytes of mask per row (53% of fp32; with int8
values 16%). The forward rebuilds the layer's dense weight from the two (`dense_weight`) and
runs one dense matmul; with int8 values at decode it scatters the int8 codes and uses the packed
int8 kernel. `benchmarks/packed_kernels.py` compares this with a CSR sparse matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memfit.memory.fake import value_or
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.packed import Int8Linear

_BIT = 1 << torch.arange(8, dtype=torch.uint8)  # bit i of a mask byte is column 8 * byte + i
# byte value -> its 8 bits as 0/1 bytes; uint8 throughout, as PyTorch's CPU kernels for bool
# tensors (where, masked_scatter, bitwise ops into bool) measured 10-100x slower here
_BITS_OF = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K / 8)], column ``k`` in bit ``k % 8`` of byte ``k // 8``."""
    n, k = keep.shape
    padded = F.pad(keep, (0, -k % 8)).view(n, -1, 8).to(torch.uint8)
    return (padded * _BIT.to(keep.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_mask` as 0/1 bytes: uint8 [N, ceil(K / 8)] -> uint8 [N, K]."""
    bits = _BITS_OF.to(mask.device).index_select(0, mask.reshape(-1).int())  # [N * K / 8, 8]
    return bits.view(mask.shape[0], -1)[:, :in_features]


def scatter_rows(kept: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] matrix with ``kept`` [N, kept] at the 1s of ``keep`` (uint8 [N, K]) in
    column order and zeros elsewhere: each position takes the value its running count of kept
    columns points at, times its own 0/1."""
    # the running count in int32, widened for gather: an int64 cumsum measured 3x slower here
    index = keep.cumsum(dim=1, dtype=torch.int32).sub_(1).clamp_(min=0).long()  # [N, K]
    return kept.gather(1, index).mul_(keep)


class SparseLinear(nn.Module):
    """A Linear whose pruned weights are not stored: kept values per row plus a bitmask.

    Args:
        values: ``nn.Linear(kept, N)`` (or a packed module of that shape) whose weight holds each
            row's kept weights in column order.
        mask: uint8 [N, ceil(K / 8)], the kept positions (`pack_mask`).
        in_features: K.
        bias: float [N] or None.
    """

    def __init__(self, values: nn.Module, mask: torch.Tensor, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.values = values
        self.register_buffer("mask", mask)
        self.register_buffer("bias", bias)
        self.in_features = in_features

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None, kept: int | None = None
    ) -> SparseLinear:
        """The weights of ``weight`` [N, K] where ``keep`` is True (the same count in every row).

        Args:
            kept: the count kept per row, if the caller knows it (a prediction on fake tensors
                cannot count the mask); checked against the mask on real tensors.
        """
        n, _ = weight.shape
        counts = keep.sum(dim=1)
        if kept is None:
            kept = int(counts[0]) if n else 0
        if not value_or((counts == kept).all(), True):
            raise ValueError(f"every row must keep {kept} weights, got {counts.unique().tolist()}")
        layer = cls.empty(weight, kept, bias)
        # the kept positions in row order, by a fixed count (shapes known before the values)
        positions = torch.nonzero_static(keep.reshape(-1), size=n * kept).squeeze(1)
        layer.values.weight.data = weight.detach().reshape(-1)[positions].view(n, kept)
        layer.mask = pack_mask(keep)
        return layer

    @classmethod
    def empty(cls, weight: torch.Tensor, kept: int, bias: torch.Tensor | None) -> SparseLinear:
        """A layer of ``weight``'s shape keeping ``kept`` weights per row, tensors uninitialized
        (on the meta device for a dry run)."""
        n, k = weight.shape
        values = nn.Linear(kept, n, bias=False, device="meta", dtype=weight.dtype)  # no random init
        storage = torch.empty(n, kept, dtype=weight.dtype, device=weight.device)
        values.weight = nn.Parameter(storage, requires_grad=False)
        mask = torch.empty(n, -(-k // 8), dtype=torch.uint8, device=weight.device)
        return cls(values, mask, k, None if bias is None else bias.detach())

    @property
    def out_features(self) -> int:
        return self.mask.shape[0]

    @property
    def kept(self) -> int:
        """Weights kept per row."""
        return self.values.in_features

    @property
    def sparsity(self) -> float:
        return 1 - self.kept / self.in_features if self.in_features else 0.0

    def keep_mask(self) -> torch.Tensor:
        """bool [N, K]: True where a weight is kept."""
        return unpack_mask(self.mask, self.in_features).bool()

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer's weight [N, K] with zeros where it was pruned."""
        values = self.values
        kept = values.weight if isinstance(values, nn.Linear) else values.dequantize(dtype or torch.float32)
        return scatter_rows(kept.to(dtype or kept.dtype), unpack_mask(self.mask, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        values = self.values
        if type(values) is Int8Linear and kernels.int8_kernel_applies(x):
            codes = scatter_rows(values.qweight, unpack_mask(self.mask, self.in_features).to(torch.int8))
            return kernels.int8_linear(x, codes, values.scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept={self.kept}, bias={self.bias is not None}"
        )
