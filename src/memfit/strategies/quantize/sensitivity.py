"""How much each part of a model suffers from rounding: the measured input to mixed bit-widths.

For every unit (a group of Linears, such as one decoder layer's attention projections), round only
that unit's weights, run the model on calibration tokens, and measure the KL divergence of its
next-token distributions from the unrounded model's. Each unit's run starts at its own decoder
layer, from inputs cached by one reference pass, so a unit in the last layer costs one layer and
the head, not the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import RecipeError
from memfit.memory.fake import is_fake
from memfit.models.arch import decoder_parts
from memfit.strategies.layerwise import capture_first_layer_inputs, run_layer

CHUNK_ROWS = 128  # tokens whose vocabulary-wide log-probabilities are computed at once

Unit = tuple[int, list[nn.Linear]]
"""The first decoder layer a unit touches, and its Linears (rounded together; they may span layers)."""


def sensitivity_table(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    units: list[Unit],
    fakes: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float | None]]:
    """Mean KL divergence (nats per token) from the model's outputs when only each unit's weights
    are replaced by each of ``fakes`` (``fake(weight)``), sharing one reference pass: per unit, one
    float per fake, in order (None on fake tensors: a prediction runs the same passes but has no
    divergence to read)."""
    parts = decoder_parts(model)
    norm, head = _tail(model)
    with torch.no_grad():
        inputs = [capture_first_layer_inputs(model, batches)]
        for layer in parts.layers:
            inputs.append(run_layer(layer, inputs[-1]))
        reference = [_log_probs(norm, head, h) for h, _ in inputs[-1]]
        members = [{id(m) for m in layer.modules()} for layer in parts.layers]
        out = []
        for done, (index, linears) in enumerate(units):
            row = []
            for fake_quantize in fakes:
                hidden = inputs[index]
                for j in range(index, len(parts.layers)):
                    # a unit may span layers (the whole model at once): round one layer's share at a time
                    with _rounded([m for m in linears if id(m) in members[j]], fake_quantize):
                        hidden = run_layer(parts.layers[j], hidden)
                row.append(_kl(reference, [h for h, _ in hidden], norm, head))
            out.append(row)
            if progress:
                progress(done + 1, len(units))
    return out


@contextlib.contextmanager
def _rounded(linears: list[nn.Linear], fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the weights of ``linears`` by ``fake_quantize(weight)`` inside the block."""
    originals = [m.weight.data for m in linears]
    try:
        for m in linears:
            m.weight.data = fake_quantize(m.weight.data).to(m.weight.dtype)
        yield
    finally:
        for m, weight in zip(linears, originals, strict=True):
            m.weight.data = weight


def _tail(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    norm, head = getattr(base, "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise RecipeError(
            f"{type(model).__name__} has no final norm at model.norm or no output head",
            "mixed bit-widths support Llama-style decoder-only models; use a uniform recipe (int4-g128-gptq)",
        )
    return norm, head


def _log_probs(norm: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [tokens, vocab] of ``hidden`` [B, T, D], in chunks of rows."""
    return torch.cat([_chunk_log_probs(norm, head, chunk) for chunk in _rows(hidden).split(CHUNK_ROWS)])


def _chunk_log_probs(norm: nn.Module, head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(head(norm(rows)).float(), dim=-1)


def _rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def _kl(reference: list[torch.Tensor], hidden: list[torch.Tensor], norm: nn.Module, head: nn.Module) -> float | None:
    """Mean KL(reference || model) per token, the model's log-probabilities computed from
    ``hidden`` a chunk of rows at a time (a vocabulary-wide float tensor per row is the large part)."""
    total, count = None, 0
    for ref, h in zip(reference, hidden, strict=True):
        for log_p, rows in zip(ref.split(CHUNK_ROWS), _rows(h).split(CHUNK_ROWS), strict=True):
            log_q = _chunk_log_probs(norm, head, rows)
            kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
            total = kl if total is None else total + kl
        count += ref.shape[0]
    return None if is_fake(total) else total.item() / count
