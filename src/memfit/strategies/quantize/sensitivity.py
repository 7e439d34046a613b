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
        reference = _Reference(norm, head, [h for h, _ in inputs[-1]])
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
                row.append(reference.kl([h for h, _ in hidden]))
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


class _Reference:
    """The model's next-token distributions p on the calibration tokens, kept in the form that
    makes KL(p || q) of another run cheap.

    With q = softmax(z), z = head(r) and r the normed hidden state of a row,
    KL(p || q) = sum p log p - sum p z + logsumexp(z), and for a Linear head
    sum p z = r . (p W) + p . b. So each reference row keeps p W and p . b (p in float64, summing
    to 1) and sum p log p, computed by the same formula from its own logits (so a run equal to the
    reference scores exactly 0), and a run's rows need their logits only for the log-normalizer:
    no vocabulary-wide log-softmax, exp or product per run. A head that is not an ``nn.Linear``
    keeps p's log-probabilities whole.
    """

    def __init__(self, norm: nn.Module, head: nn.Module, hidden: list[torch.Tensor]) -> None:
        self.norm, self.head = norm, head
        self.linear = isinstance(head, nn.Linear)
        self.rows = []  # per batch, per chunk: (sum p log p, p W, p . b) or log p
        for h in hidden:
            chunks = []
            for rows in _rows(h).split(CHUNK_ROWS):
                if not self.linear:
                    chunks.append(_chunk_log_probs(norm, head, rows))
                    continue
                r = norm(rows)
                z = head(r).float()
                p = torch.softmax(z.double(), dim=-1)
                p_weight = p @ head.weight.double()
                p_bias = None if head.bias is None else p @ head.bias.double()
                chunks.append((self._cross(r, p_weight, p_bias) - self._log_norm(z), p_weight, p_bias))
            self.rows.append(chunks)
        self.count = sum(_rows(h).shape[0] for h in hidden)

    def kl(self, hidden: list[torch.Tensor]) -> float | None:
        """Mean KL(reference || run) per token of a run whose last hidden states are ``hidden``."""
        total = None
        for chunks, h in zip(self.rows, hidden, strict=True):
            for ref, rows in zip(chunks, _rows(h).split(CHUNK_ROWS), strict=True):
                if self.linear:
                    neg_entropy, p_weight, p_bias = ref
                    r = self.norm(rows)
                    kl = (neg_entropy - self._cross(r, p_weight, p_bias) + self._log_norm(self.head(r).float())).sum()
                else:
                    kl = F.kl_div(_chunk_log_probs(self.norm, self.head, rows), ref, reduction="sum", log_target=True)
                total = kl if total is None else total + kl
        return None if is_fake(total) else total.item() / self.count


    @staticmethod
    def _cross(r: torch.Tensor, p_weight: torch.Tensor, p_bias: torch.Tensor | None) -> torch.Tensor:
        """sum_v p_v z_v of each row, from its normed hidden state ``r``."""
        cross = (r.double() * p_weight).sum(-1)
        return cross if p_bias is None else cross + p_bias

    @staticmethod
    def _log_norm(logits: torch.Tensor) -> torch.Tensor:
        """logsumexp of each row, read off log-softmax at the row's largest logit (where it is
        near 0, so little is lost): on CPU, torch's log-softmax is vectorized and its logsumexp
        several times slower."""
        top, index = logits.max(dim=-1, keepdim=True)
        return (top - F.log_softmax(logits, dim=-1).gather(-1, index)).squeeze(-1).double()


def _chunk_log_probs(norm: nn.Module, head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(head(norm(rows)).float(), dim=-1)


def _rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])
