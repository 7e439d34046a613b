"""Activation-aware scaling in the manner of AWQ: before rounding, scale up the weight columns
that meet large activations and fold the inverse scale into the operation feeding them.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(2023). For a group of Linears sharing one input x (q/k/v after the input norm; gate/up after the
post-attention norm; down after up; o after v when their widths match), the output
``x @ W.T = (x / s) @ (W * s).T`` is unchanged for any per-channel s > 0, but rounding ``W * s``
loses less on channels with large s. s = mean|x|^alpha, with alpha searched on a grid to minimise
the groups' output error after rounding on the calibration inputs. The 1/s is folded into the
preceding norm's weight or Linear's rows, so nothing is added to the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from memfit.memory.fake import value_or
from memfit.models.arch import LLAMA, Layout
from memfit.strategies.layerwise import LayerInputs, observe_inputs

ALPHAS = tuple(i / 20 for i in range(20))
MAX_TOKENS = 4096  # calibration rows kept per group for the search


@dataclasses.dataclass
class ScaleGroup:
    """Linears sharing one input, and the module whose output that input is."""

    name: str
    previous: nn.Module
    linears: list[nn.Linear]


def scale_groups(layer: nn.Module, layout: Layout = LLAMA) -> list[ScaleGroup]:
    """The groups AWQ can scale in a Llama-style decoder layer (names from ``layout``,
    `memfit.models.arch`); a group whose parts are missing or whose widths do not match is left out."""
    attn, mlp = getattr(layer, layout.attention, None), getattr(layer, layout.mlp, None)
    get = lambda owner, *names: [getattr(owner, n, None) for n in names] if owner is not None else [None] * len(names)
    q, k, v, o = get(attn, *layout.attention_linears)
    gate, up, down = get(mlp, *layout.mlp_linears)
    candidates = [
        ScaleGroup("qkv", getattr(layer, layout.input_norm, None), [q, k, v]),
        ScaleGroup("o", v, [o]),
        ScaleGroup("gate_up", getattr(layer, layout.post_attention_norm, None), [gate, up]),
        ScaleGroup("down", up, [down]),
    ]
    groups = []
    for group in candidates:
        if group.previous is None or any(not isinstance(m, nn.Linear) for m in group.linears):
            continue
        width = group.linears[0].in_features
        feeds = group.previous.out_features if isinstance(group.previous, nn.Linear) else _norm_width(group.previous)
        if feeds == width and all(m.in_features == width for m in group.linears):
            groups.append(group)
    return groups


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def awq_scale_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    groups: list[ScaleGroup] | None = None,
) -> dict[str, float]:
    """Search and apply AWQ scales to ``layer`` in place; returns the chosen alpha per group.

    Args:
        inputs: the layer's calibration inputs.
        fake_quantize: rounds a weight [N, K] to the target grid and back to float.
        groups: the groups to scale (default: `scale_groups(layer)`).
    """
    groups = scale_groups(layer) if groups is None else groups
    captured: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    rows = dict.fromkeys(captured, 0)

    def capture(name: str):
        def keep(x: torch.Tensor) -> None:
            if rows[name] < MAX_TOKENS:
                x = x.reshape(-1, x.shape[-1])[: MAX_TOKENS - rows[name]].float()
                captured[name].append(x)
                rows[name] += x.shape[0]

        return keep

    observe_inputs(layer, inputs, {g.linears[0]: capture(g.name) for g in groups})
    chosen = {}
    for group in groups:
        x = torch.cat(captured[group.name])
        scale, alpha = _search(x, group.linears, fake_quantize)
        if folds_into(group.previous, scale):
            fold_scale(group, scale)
            chosen[group.name] = alpha
    return chosen


@torch.no_grad()
def folds_into(previous: nn.Module, scale: torch.Tensor) -> bool:
    """True if dividing ``previous``'s weight by ``scale`` divides its output by ``scale`` (a
    Linear, or a norm that multiplies by its weight; not one that adds 1 to it, as Gemma's do)."""
    if isinstance(previous, nn.Linear):
        return True
    weight = previous.weight
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    before = previous(x)
    original = weight.detach().clone()
    weight.div_(scale.to(weight.dtype))
    after = previous(x)
    weight.copy_(original)
    expected = before.float() / scale
    atol = 1e-3 * expected.abs().max()
    close = ((after.float() - expected).abs() <= atol + 1e-2 * expected.abs()).all()
    return bool(value_or(close, True))  # a prediction assumes it folds (Llama-style norms do)


def _search(x: torch.Tensor, linears: list[nn.Linear], fake_quantize) -> tuple[torch.Tensor, float]:
    weight = torch.cat([m.weight.detach().float() for m in linears])  # [sum N, K]
    reference = x @ weight.t()
    activity = x.abs().mean(0).clamp(min=1e-6)
    best_error = best_scale = best_alpha = None
    for alpha in ALPHAS:  # the best so far is kept on the device: no value is read inside the loop
        scale = activity.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = (x @ (fake_quantize(weight * scale) / scale).t() - reference).pow(2).mean()
        if best_error is None:
            best_error, best_scale, best_alpha = error, scale, torch.tensor(alpha)
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_alpha = torch.where(better, alpha, best_alpha)
    return best_scale, value_or(best_alpha, ALPHAS[0])


@torch.no_grad()
def fold_scale(group: ScaleGroup, scale: torch.Tensor) -> None:
    """Multiply the group's weight columns by ``scale`` and divide ``previous``'s output by it."""
    previous = group.previous
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scale.to(previous.weight.dtype)[:, None])
        if previous.bias is not None:
            previous.bias.div_(scale.to(previous.bias.dtype))
    else:
        previous.weight.div_(scale.to(previous.weight.dtype))
    for linear in group.linears:
        linear.weight.mul_(scale.to(linear.weight.dtype)[None, :])
