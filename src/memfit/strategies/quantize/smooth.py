"""SmoothQuant-style smoothing: move activation outliers into the weights before W8A8 rounding.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (2023). Rounding activations to int8 per token loses the small channels of a token that
has a few huge ones. For a group of Linears sharing one input (`memfit.strategies.quantize.awq.scale_groups`),
``x @ W.T = (x / s) @ (W * s).T``; with ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` the
per-channel ranges of x and W meet in the middle (alpha = 0.5 splits the difficulty evenly). The 1/s
is folded into the preceding norm or Linear, so the model gains no operation.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.strategies.layerwise import LayerInputs, observe_inputs
from memfit.strategies.quantize.awq import ScaleGroup, fold_scale, folds_into, scale_groups


def smooth_layer(
    layer: nn.Module, inputs: LayerInputs, alpha: float, groups: list[ScaleGroup] | None = None
) -> list[str]:
    """Smooth ``layer``'s groups in place from the per-channel maxima of their calibration
    inputs; returns the names of the groups smoothed (those whose scale folds into ``previous``)."""
    groups = scale_groups(layer) if groups is None else groups
    maxima: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def update(x: torch.Tensor) -> None:
            channel_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # [K]
            maxima[name] = channel_max if name not in maxima else torch.maximum(maxima[name], channel_max)

        return update

    observe_inputs(layer, inputs, {g.linears[0]: observe(g.name) for g in groups})
    smoothed = []
    for group in groups:
        weight_max = torch.stack([m.weight.detach().abs().amax(dim=0).float() for m in group.linears]).amax(dim=0)
        scale = smoothing_scale(maxima[group.name], weight_max, alpha)
        if folds_into(group.previous, scale):
            fold_scale(group, scale)
            smoothed.append(group.name)
    return smoothed


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` per channel, 1 where either is zero."""
    scale = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), scale, torch.ones_like(scale))
