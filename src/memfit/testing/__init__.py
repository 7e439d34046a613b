"""Test helpers shipped with memfit, for its own suite and for strategies written elsewhere."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB.

    Example:
        >>> sqnr_db(torch.ones(4), torch.ones(4) * 1.01)  # about 40 dB
    """
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp(min=1e-30)))
