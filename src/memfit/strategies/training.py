"""Training-time strategies: `Checkpointing`, `Autocast` and the `Optimizer` choice.

They change no weights. Checkpointing and autocast change how the forward runs (what it keeps for
backward, in which precision it computes); the optimizer choice decides what state training
holds. The estimator runs them like any other strategy, so their memory is predicted by running
the same code on fake tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.base import Phase, Strategy, register_field_type
from memfit.strategies.precision import Precision
from memfit.strategies.registry import register

if TYPE_CHECKING:
    from memfit.plan import Context, Workload


def _training_only(cls: type[Strategy], workload: Workload) -> list[Strategy]:
    from memfit.plan import Mode

    return cls.examples() if workload.mode is Mode.TRAIN else []


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpointing(Strategy):
    """Activation checkpointing: keep only each decoder layer's input, recompute the rest in backward.

    Memory: activations saved for backward fall from every intermediate of every layer to one
    hidden state per checkpointed layer (plus one layer's intermediates during its recompute).
    Speed: one extra forward per checkpointed layer, about a third more compute per step. Quality:
    none, the gradients are the same. Uses transformers' own switch (non-reentrant
    ``torch.utils.checkpoint``), so it only affects models in training mode.

    Args:
        every: checkpoint every ``every``-th decoder layer (1: all of them).
    """

    name = "checkpointing"
    phase = Phase.RUNTIME
    saves = frozenset({"activations"})

    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be at least 1, got {self.every}")

    @property
    def token(self) -> str:
        return "checkpointing" if self.every == 1 else f"checkpointing-{self.every}"

    @classmethod
    def from_token(cls, token: str) -> Checkpointing | None:
        match = re.fullmatch(r"checkpointing(?:-(\d+))?", token)
        if match is None:
            return None
        every = int(match.group(1) or 1)
        if every < 1:
            raise RecipeError(f"recipe token {token!r} checkpoints every 0th layer", "use checkpointing-K with K >= 1")
        return cls(every=every)

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(every=2)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is None:
            raise RecipeError(
                f"{type(model).__name__} does not support activation checkpointing",
                "remove 'checkpointing' from the recipe",
            )
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=self.every)
        return model


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Autocast(Strategy):
    """Mixed precision: the forward computes matmuls in bf16 (or fp16) while the weights stay as they are.

    Memory: activations saved for backward are half size; each weight gets a low-precision copy
    for the duration of a forward (the copies are what backward uses). Weights, gradients and
    optimizer state keep their precision (fp32 master weights). Speed: bf16 matmuls are about 2x
    fp32 on CPUs with bf16 dot products and much faster on GPUs. Uses ``torch.autocast``.

    Args:
        precision: the compute format.
    """

    name = "autocast"
    phase = Phase.RUNTIME
    sqnr_floor_db = 20.0
    saves = frozenset({"activations"})

    precision: Precision = Precision.BF16

    @property
    def token(self) -> str:
        return f"{self.precision.value}-autocast"

    @classmethod
    def from_token(cls, token: str) -> Autocast | None:
        match = re.fullmatch(r"(bf16|fp16)-autocast", token)
        return cls(precision=Precision(match.group(1))) if match else None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        # A bound method (not a closure), so copies of the model (`meta_copy`, deepcopy) autocast
        # their own forward.
        model.memfit_autocast_dtype = self.precision.dtype
        model.forward = types.MethodType(_autocast_forward, model)
        return model


def _autocast_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    device = next(self.parameters()).device.type
    with torch.autocast(device_type=device, dtype=self.memfit_autocast_dtype):
        return type(self).forward(self, *args, **kwargs)


@register_field_type
class OptimizerKind(enum.Enum):
    """Optimizers a training workload can use."""

    ADAMW = "adamw"
    SGD = "sgd"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer(Strategy):
    """The optimizer training uses, and so the state it holds: AdamW (default) or SGD with momentum.

    Memory per trainable parameter, in the parameter's dtype: AdamW two moments (2x), SGD with
    momentum one buffer (1x). Quality: the optimizer changes how training converges, not what
    the model is.

    Args:
        kind: which optimizer.
    """

    name = "optimizer"
    phase = Phase.RUNTIME
    saves = frozenset({"optimizer_state"})

    kind: OptimizerKind = OptimizerKind.ADAMW

    @property
    def token(self) -> str:
        return self.kind.value

    @classmethod
    def from_token(cls, token: str) -> Optimizer | None:
        try:
            return cls(kind=OptimizerKind(token))
        except ValueError:
            return None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(kind=OptimizerKind.SGD)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model  # the choice is read from ``model.memfit_plan`` by `build_optimizer`

    def build(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``params``. ``foreach=False``: the per-parameter loop, whose
        temporaries are one parameter's size (the foreach path's depend on grouping heuristics)."""
        if self.kind is OptimizerKind.SGD:
            return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False)
        return torch.optim.AdamW(params, lr=lr, foreach=False)


def build_optimizer(model: nn.Module, lr: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``model``'s plan chose (AdamW if none) over its trainable parameters."""
    plan = getattr(model, "memfit_plan", None)
    chosen = next((s for s in getattr(plan, "strategies", ()) if isinstance(s, Optimizer)), Optimizer())
    return chosen.build([p for p in model.parameters() if p.requires_grad], lr)
