"""Shared fixtures: tiny seeded models (deep-copied per test) and the demo model (slow tests)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import memfit
from memfit.models import tiny

TINY_NAMES = tuple(tiny.CONFIGS)


@functools.lru_cache(maxsize=None)
def _tiny(name: str):
    return tiny.tiny_model(name)


@pytest.fixture
def make_tiny():
    """``make_tiny(name)`` -> a fresh deep copy of tiny model ``name`` and its tokenizer."""

    def make(name: str = "tiny-llama"):
        model, tokenizer = _tiny(name)
        return copy.deepcopy(model), tokenizer

    return make


@pytest.fixture
def tokens() -> torch.Tensor:
    """A fixed batch of token ids for tiny models: [2, 48]."""
    return torch.randint(0, tiny.VOCAB_SIZE, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def demo():
    """The demo model (SmolLM2-135M-Instruct), loaded once per session; do not mutate it."""
    return memfit.load("demo")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.float(), approx.float()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp(min=1e-30)))
