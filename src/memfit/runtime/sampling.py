"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty, from a seeded generator.

The order of the transforms is transformers' (repetition penalty, temperature, top-k, top-p), so
the same settings mean the same distribution.
"""

from __future__ import annotations

import dataclasses

import numpy
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from memfit.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        temperature: 0 for greedy (the default); otherwise logits are divided by it and sampled.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p (1: all).
        repetition_penalty: divide positive (multiply negative) logits of tokens already in the
            row (prompt included) by this (1: off), as in the CTRL paper and transformers.
        seed: seeds the sampling generator (sampled runs with the same seed give the same text).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (self.top_k >= 0, f"top-k must be >= 0 (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1] (got {self.top_p})"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0 (got {self.repetition_penalty})"),
        )
        for ok, message in checks:
            if not ok:
                raise RecipeError(message, "see memfit generate --help for the ranges")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class Sampler:
    """Applies a `Sampling` to logits [B, V], one call per step, with its own generator."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu") -> None:
        self.sampling = sampling
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next tokens [B] from ``logits`` [B, V] (float); ``seen`` [B, V] bool marks tokens in each row."""
        s = self.sampling
        if s.repetition_penalty != 1.0 and seen is not None:
            penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if s.greedy:
            return _argmax(logits)
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[-1]:
            kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= s.top_p  # mass before a token already reaches p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` [B]; on a real CPU tensor through NumPy, whose argmax over one row of
    a 49k vocabulary takes 5 us where PyTorch's takes 75 us (1.5% of a demo int8 token). Tracked and
    fake runs take PyTorch's, which allocates the same [B] result."""
    # a plain tensor (not fake, not a subclass), under no dispatch mode (the tracker counts torch's ops)
    if (type(logits) is not torch.Tensor or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.requires_grad or _get_current_dispatch_mode() is not None):
        return logits.argmax(-1)
    out = torch.empty(logits.shape[:-1], dtype=torch.long)
    numpy.argmax(logits.detach().numpy(), axis=-1, out=out.numpy())
    return out
