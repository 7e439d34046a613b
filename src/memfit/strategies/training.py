"""Training-time strategies: `Checkpointing`, `MasterWeights` and `LoRA`.

Each changes the model: checkpointing switches the decoder layers to recompute their activations
in backward, master weights cast the trainable weights to bf16, LoRA adds adapters and freezes the
rest. How a step runs without changing the model (the optimizer, micro-batches, processes,
autocast) is a run setting (`memfit.settings`), not a strategy. The estimator runs these like any
other strategy, so their memory is predicted by running the same code on fake tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.lora import inject
from memfit.strategies.precision import Cast, Precision, recompute_contexts
from memfit.strategies.registry import register
from memfit.workload import Mode

if TYPE_CHECKING:
    from memfit.workload import Context, Workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TrainingStrategy(Strategy):
    """A strategy the planner offers for training workloads only; its example is its default."""

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return cls.examples() if workload.mode is Mode.TRAIN else []


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpointing(_TrainingStrategy):
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
    forms = "checkpointing[-K]"
    summary = "training: recompute every (K-th) decoder layer's activations in backward"
    phase = Phase.RUNTIME
    saves = frozenset({"activations"})
    train_only = True

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

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is None:
            raise RecipeError(
                f"{type(model).__name__} does not support activation checkpointing",
                "remove 'checkpointing' from the recipe",
            )
        kwargs = {"use_reentrant": False, "context_fn": recompute_contexts}
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=self.every)
        return model


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MasterWeights(_TrainingStrategy):
    """bf16 weights trained through fp32 master copies (``bf16-master``).

    The model's floating weights become bf16, so the forward and backward compute in bf16 and
    gradients are bf16; the optimizer keeps an fp32 copy of each parameter, steps it in fp32 and
    writes it back rounded (`memfit.optim.MasterWeights`). Memory per parameter: 2 (bf16
    weight) + 2 (bf16 gradient) + 4 (master) + the optimizer's state over fp32; activations are
    half of fp32's. Quality: updates accumulate in fp32, so small steps are not lost to bf16
    rounding (pure bf16 training loses them).
    """

    name = "master-weights"
    forms = "bf16-master|fp16-master"
    summary = "training: bf16/fp16 weights stepped through fp32 master copies"
    phase = Phase.PRECISION
    conflicts = ("cast",)
    sqnr_floor_db = 20.0
    saves = frozenset({"parameters", "activations"})  # the masters are optimizer state

    precision: Precision = Precision.BF16

    @property
    def token(self) -> str:
        return f"{self.precision.value}-master"

    @classmethod
    def from_token(cls, token: str) -> MasterWeights | None:
        match = re.fullmatch(r"(bf16|fp16)-master", token)
        return cls(precision=Precision(match.group(1))) if match else None

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return Cast(precision=self.precision).apply(model, ctx)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(_TrainingStrategy):
    """Low-rank adapters (LoRA, through peft) on every linear layer of the decoder; the rest frozen.

    Each targeted Linear y = W x gains y += (alpha / r) B A x with A [r, K], B [N, r], B zero at
    the start, and only A and B train. Memory: gradients and optimizer state shrink to the
    adapters' (a fraction of a percent of the model); the frozen weights keep no gradient. On a
    quantized base (``int4-g128,lora-8``, QLoRA-style) the base stays packed and the adapters are
    bf16; backward through a packed layer dequantizes its weight one layer at a time
    (`memfit.strategies.quantize.packed`), so nothing holds a float copy of the base.

    Args:
        rank: r, the adapters' rank.
        alpha: the scale numerator (``alpha / rank`` multiplies the adapter's output).
    """

    name = "lora"
    forms = "lora-R[-aA]"
    summary = "training: LoRA adapters of rank R (scale A / R) on the decoder Linears, the rest frozen"
    phase = Phase.RUNTIME
    order = 1  # after the model's own runtime switches, so adapters see the final modules
    # gradients shrink too, but the peak of a step comes before they accumulate
    saves = frozenset({"optimizer_state"})

    rank: int = 8
    alpha: int = 16

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"LoRA rank and alpha must be at least 1, got rank={self.rank}, alpha={self.alpha}")

    @property
    def token(self) -> str:
        return f"lora-{self.rank}" if self.alpha == 2 * self.rank else f"lora-{self.rank}-a{self.alpha}"

    @classmethod
    def from_token(cls, token: str) -> LoRA | None:
        match = re.fullmatch(r"lora-(\d+)(?:-a(\d+))?", token)
        if match is None:
            return None
        rank = int(match.group(1))
        if rank < 1:
            raise RecipeError(f"recipe token {token!r} has rank 0", "use lora-R with R >= 1, such as lora-8")
        return cls(rank=rank, alpha=int(match.group(2) or 2 * rank))

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        inject(model, self.rank, self.alpha)
        return model


