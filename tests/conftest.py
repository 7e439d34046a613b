"""Shared fixtures: tiny seeded models (deep-copied per test) and the demo model (slow tests)."""

from __future__ import annotations

import os

# Tests never touch the network: hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import memfit  # noqa: E402
from memfit.models import tiny  # noqa: E402

TINY_NAMES = tuple(tiny.CONFIGS)


@functools.cache
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


# Order: the demo-model tests (`slow`, minutes each) first, then the files whose tests start processes
# (torchrun ranks, killed and resumed runs, planner workers, the CLI entry point) or run the estimator on an 80-layer
# model, then the rest: the short tests fill the end of both pytest-xdist workers instead of one
# worker finishing a long test while the other waits.
_LONG_FIRST = ("test_train_distributed.py", "test_train.py", "test_trials.py", "test_estimate.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(_LONG_FIRST)}
    # stable: the file order is kept otherwise
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, order.get(item.path.name, len(_LONG_FIRST))))
