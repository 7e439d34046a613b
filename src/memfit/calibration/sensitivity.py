"""How much each part of a model suffers from rounding: the measured input to mixed bit-widths.

For every unit (a group of Linears, such as one decoder layer's attention projections), round only
that unit's weights, run the model on calibration tokens, and measure the KL divergence of its
next-token distributions from the unrounded model's. Each unit's run starts at its own decoder
layer, from inputs cached by one reference pass, so a unit in the last layer costs one layer and
the head, not the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memfit.calibration.layerwise import capture_first_layer_inputs, run_layer
from memfit.errors import RecipeError
from memfit.models.arch import decoder_parts

Unit = tuple[int, list[nn.Linear]]
"""A decoder layer index and the Linears of that layer rounded together."""


def unit_sensitivities(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    units: list[Unit],
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Mean KL divergence (nats per token) from the model's outputs when only each unit's weights
    are replaced by ``fake_quantize(weight)``; one float per unit, in order."""
    parts = decoder_parts(model)
    norm, head = _tail(model)
    with torch.no_grad():
        inputs = [capture_first_layer_inputs(model, batches)]
        for layer in parts.layers:
            inputs.append(run_layer(layer, inputs[-1]))
        reference = [F.log_softmax(_logits(norm, head, h), dim=-1) for h, _ in inputs[-1]]
        out = []
        for done, (index, linears) in enumerate(units):
            originals = [m.weight.data for m in linears]
            try:
                for m in linears:
                    m.weight.data = fake_quantize(m.weight.data).to(m.weight.dtype)
                hidden = inputs[index]
                for layer in parts.layers[index:]:
                    hidden = run_layer(layer, hidden)
            finally:
                for m, weight in zip(linears, originals, strict=True):
                    m.weight.data = weight
            out.append(_kl(reference, [_logits(norm, head, h) for h, _ in hidden]))
            if progress:
                progress(done + 1, len(units))
    return out


def _tail(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    norm, head = getattr(base, "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise RecipeError(
            f"{type(model).__name__} has no final norm at model.norm or no output head",
            "mixed bit-widths support Llama-style decoder-only models; use a uniform recipe (int4-g128-gptq)",
        )
    return norm, head


def _logits(norm: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return head(norm(hidden)).float()


def _kl(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ref, out in zip(reference, logits, strict=True):
        log_q = F.log_softmax(out, dim=-1)
        total += (ref.exp() * (ref - log_q)).sum().item()
        count += ref.numel() // ref.shape[-1]
    return total / count
