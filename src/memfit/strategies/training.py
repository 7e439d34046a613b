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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.base import Phase, Strategy, register_field_type
from memfit.strategies.lora import inject
from memfit.strategies.precision import Precision
from memfit.strategies.registry import register
from memfit.workload import Mode

if TYPE_CHECKING:
    from memfit.workload import Context, Workload


def _training_only(cls: type[Strategy], workload: Workload) -> list[Strategy]:
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PrecisionTokens(Strategy):
    """Training strategies spelled ``<precision>-<suffix>`` (``bf16-autocast``, ``bf16-master``)."""

    suffix: ClassVar[str]

    precision: Precision = Precision.BF16

    @property
    def token(self) -> str:
        return f"{self.precision.value}-{self.suffix}"

    @classmethod
    def from_token(cls, token: str) -> _PrecisionTokens | None:
        match = re.fullmatch(rf"(bf16|fp16)-{cls.suffix}", token)
        return cls(precision=Precision(match.group(1))) if match else None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Autocast(_PrecisionTokens):
    """Mixed precision: the forward computes matmuls in bf16 (or fp16) while the weights stay as they are.

    Memory: activations saved for backward are half size. Weights, gradients and optimizer state
    keep their precision (fp32 master weights). Plain ``torch.autocast`` would also keep a bf16 copy
    of every weight from its forward until its backward (half the fp32 model, more than the
    activations save at short sequences); memfit's Linears cast their weight again in backward
    instead (`_CastedLinear`), so autocast holds no weight copies. Speed: bf16 matmuls are about 2x
    fp32 on CPUs with bf16 dot products and much faster on GPUs; the second cast costs one read
    of the weights per step.

    Args:
        precision: the compute format.
    """

    name = "autocast"
    forms = "bf16-autocast|fp16-autocast"
    summary = "training: the forward computes in bf16/fp16, weights stay as they are"
    suffix = "autocast"
    phase = Phase.RUNTIME
    sqnr_floor_db = 20.0
    saves = frozenset({"activations"})

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        # Bound methods (not closures), so copies of the model (`meta_copy`, deepcopy) autocast
        # their own forward.
        model.memfit_autocast_dtype = self.precision.dtype
        model.forward = types.MethodType(_autocast_forward, model)
        for module in model.modules():
            if type(module) is nn.Linear:
                module.forward = types.MethodType(_casted_linear_forward, module)
        return model


def _autocast_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    device = next(self.parameters()).device.type
    with torch.autocast(device_type=device, dtype=self.memfit_autocast_dtype):
        return type(self).forward(self, *args, **kwargs)


def _casted_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.is_grad_enabled() and self.weight.requires_grad:
        return _CastedLinear.apply(x, self.weight, self.bias, torch.get_autocast_dtype(device))
    return nn.functional.linear(x, self.weight, self.bias)


class _CastedLinear(torch.autograd.Function):
    """``linear(x, W, b)`` computed in ``dtype`` that saves the input in ``dtype`` and the weight
    itself (no copy) for backward, where the weight is cast again: the same arithmetic as
    autocast's, without a low-precision copy of every weight alive between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        low = x.to(dtype)
        out = nn.functional.linear(low, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(low, weight)
        ctx.x_dtype, ctx.dtype, ctx.has_bias = x.dtype, dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        low, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        rows = grad.reshape(-1, grad.shape[-1])  # [M, N]
        if ctx.needs_input_grad[1]:
            grad_w = (rows.t() @ low.reshape(-1, low.shape[-1])).to(weight.dtype)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


@register_field_type
class OptimizerKind(enum.Enum):
    """Optimizers a training workload can use."""

    ADAMW = "adamw"
    ADAMW_8BIT = "adamw-8bit"
    ADAFACTOR = "adafactor"
    SGD = "sgd"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer(Strategy):
    """The optimizer training uses, and so the state it holds.

    Memory per trainable parameter of n elements, for fp32 parameters: AdamW (default) two fp32
    moments, 8n bytes; 8-bit AdamW two 8-bit codes plus a scale per 256, about 2.03n
    (`memfit.optim.AdamW8bit`); Adafactor factored second moments, R + C numbers for an
    R x C matrix and no first moment; SGD with momentum one buffer, 4n. Quality: the optimizer
    changes how training converges, not what the model is; tests check 8-bit AdamW's loss against
    fp32 AdamW's.

    Args:
        kind: which optimizer.
    """

    name = "optimizer"
    forms = "adamw|adamw-8bit|adafactor|sgd"
    summary = "training: the optimizer, and so the state it holds"
    phase = Phase.RUNTIME
    saves = frozenset({"optimizer_state"})
    train_only = True

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
        return [cls(kind=k) for k in (OptimizerKind.ADAMW_8BIT, OptimizerKind.ADAFACTOR, OptimizerKind.SGD)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model  # the choice is read from ``model.memfit_plan`` by `build_optimizer`

    def build(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``params``. torch's optimizers run with ``foreach=False``: the
        per-parameter loop, whose temporaries are one parameter's size (the foreach path's depend
        on grouping heuristics)."""
        from memfit import optim

        if self.kind is OptimizerKind.SGD:
            return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False)
        if self.kind is OptimizerKind.ADAMW_8BIT:
            return optim.AdamW8bit(params, lr=lr)
        if self.kind is OptimizerKind.ADAFACTOR:
            return optim.Adafactor(params, lr=lr)
        return torch.optim.AdamW(params, lr=lr, foreach=False)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MasterWeights(_PrecisionTokens):
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
    suffix = "master"
    phase = Phase.PRECISION
    conflicts = ("cast",)
    sqnr_floor_db = 20.0
    saves = frozenset({"parameters", "activations"})  # the masters are optimizer state

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        from memfit.strategies.precision import Cast

        return Cast(precision=self.precision).apply(model, ctx)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(Strategy):
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

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return _training_only(cls, workload)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        inject(model, self.rank, self.alpha)
        return model


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class GradAccum(Strategy):
    """Gradient accumulation: each optimizer step runs ``steps`` micro-batches of batch / steps.

    Memory: activations are a micro-batch's; gradients and optimizer state are unchanged. Speed:
    smaller matmuls, the same work. Quality: the same gradient as the full batch (up to rounding).
    ``memfit train --budget`` picks the micro-batch itself (the largest whose predicted peak fits).

    Args:
        steps: micro-batches per optimizer step; must divide the batch size.
    """

    name = "grad-accum"
    forms = "grad-accum-N"
    summary = "training: N micro-batches per optimizer step"
    phase = Phase.RUNTIME
    saves = frozenset({"activations"})
    train_only = True

    steps: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"grad-accum needs at least 1 micro-batch, got {self.steps}")

    @property
    def token(self) -> str:
        return f"grad-accum-{self.steps}"

    @classmethod
    def from_token(cls, token: str) -> GradAccum | None:
        match = re.fullmatch(r"grad-accum-(\d+)", token)
        if match is None:
            return None
        if int(match.group(1)) < 1:
            raise RecipeError(f"recipe token {token!r} has no micro-batches", "use grad-accum-N with N >= 1")
        return cls(steps=int(match.group(1)))

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return [cls()] if workload.mode is Mode.TRAIN and workload.batch_size % 2 == 0 else []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model  # `memfit.train` and the train workload read it from the plan


@register_field_type
class Parallelism(enum.Enum):
    """How training spreads over processes."""

    DDP = "ddp"
    FSDP = "fsdp"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Distributed(Strategy):
    """Training over several processes started by torchrun: data-parallel or sharded.

    ``ddp``: every rank holds the whole model and optimizer and runs batch / ranks sequences;
    gradients are averaged by all-reduce (`torch.nn.parallel.DistributedDataParallel`, gradients
    as views into its buckets, so no second copy). Memory per rank: the activations shrink with
    the per-rank batch. ``fsdp``: parameters, gradients and optimizer state are sharded over the
    ranks (FSDP2, ``torch.distributed.fsdp.fully_shard`` per decoder layer); a layer's full
    parameters exist only while it runs. Memory per rank: about 1 / ranks of parameters,
    gradients and optimizer state, plus one layer gathered. gloo on CPU, nccl on CUDA.

    Args:
        kind: ddp or fsdp.
    """

    name = "distributed"
    forms = "ddp|fsdp"
    summary = "training over torchrun processes: data-parallel, or sharded with FSDP2"
    phase = Phase.RUNTIME
    # what it saves is per rank, with several processes (tests/test_train_distributed.py); in
    # one process it changes nothing
    saves: ClassVar[frozenset[str]] = frozenset()
    train_only = True

    kind: Parallelism = Parallelism.DDP

    @property
    def token(self) -> str:
        return self.kind.value

    @classmethod
    def from_token(cls, token: str) -> Distributed | None:
        try:
            return cls(kind=Parallelism(token))
        except ValueError:
            return None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(kind=Parallelism.DDP), cls(kind=Parallelism.FSDP)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return [cls(kind=Parallelism.FSDP)] if workload.mode is Mode.TRAIN and workload.ranks > 1 else []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model  # `memfit.train` wraps the model once the process group exists


def find(plan: Any, cls: type[Strategy]) -> Any:
    """The strategy of type ``cls`` in ``plan`` (a `Plan` or None), or None."""
    return next((s for s in getattr(plan, "strategies", ()) if isinstance(s, cls)), None)


def micro_batches(plan: Any, workload: Workload) -> tuple[int, int]:
    """``(sequences per micro-batch, micro-batches per step)`` of one rank under ``plan``.

    Raises:
        RecipeError: the batch does not split evenly over the ranks and micro-batches.
    """
    accum = find(plan, GradAccum)
    count = accum.steps if accum else 1
    parts = workload.ranks * count
    if workload.batch_size % parts:
        raise RecipeError(
            f"batch {workload.batch_size} does not split into {workload.ranks} rank(s) x {count} micro-batch(es)",
            f"use a batch that is a multiple of {parts}",
        )
    return workload.batch_size // parts, count


def build_optimizer(model: nn.Module, lr: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``model``'s plan chose (AdamW if none) over its trainable parameters; with
    ``bf16-master`` in the plan, stepped through fp32 master copies."""
    plan = getattr(model, "memfit_plan", None)
    chosen = find(plan, Optimizer) or Optimizer()
    params = [p for p in model.parameters() if p.requires_grad]
    if find(plan, MasterWeights) is not None:
        from memfit.optim import MasterWeights as MasterOptimizer

        return MasterOptimizer(params, lambda ps, group: chosen.build(ps, group["lr"]), {"lr": lr})
    return chosen.build(params, lr)
