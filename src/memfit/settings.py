"""Run settings: how a workload runs, as opposed to what the model is.

The optimizer, the micro-batches per step, the processes a batch is split over and autocast change
no module of the model, so they are not strategies. A recipe still names them with the same kind
of token (``int4-g128,lora-8,adamw-8bit,grad-accum-2``); `memfit.plan.Plan.parse` sends those
tokens here, the plan keeps them as a typed `RunSettings`, and `Plan.run` is what the workload
runner (`memfit.profile`), the estimator and `memfit.train` are handed explicitly. Nothing reads
them back from a model.

Effects, for a model of n trainable fp32 parameters:

- ``optimizer``: AdamW (default) holds two fp32 moments, 8n bytes; ``adamw-8bit`` two 8-bit codes
  plus a scale per 256, about 2.03n (`memfit.optim.AdamW8bit`); ``adafactor`` factored second
  moments, R + C numbers for an R x C matrix; ``sgd`` (momentum 0.9) one buffer, 4n.
- ``grad-accum-N``: activations are a micro-batch's (batch / N); gradients and optimizer state are
  unchanged; the same gradient up to rounding.
- ``ddp`` / ``fsdp``: per rank, activations of batch / ranks; with ``fsdp`` also about 1 / ranks of
  parameters, gradients and optimizer state plus one decoder layer gathered.
- ``bf16-autocast``: the forward computes matmuls in bf16; activations saved for backward are half
  size while weights, gradients and optimizer state keep their precision. Linears save their bf16
  input and the fp32 weight itself and cast the weight again in backward, so no bf16 copy of every
  weight lives from forward to backward (plain ``torch.autocast``'s cost).
- ``kv-int8`` / ``kv-int4``: generation keeps its KV cache quantized (`memfit.runtime.kvcache`):
  0.516x / 0.297x the bytes of an fp16 cache of head_dim 64 at 2,048 tokens, scales counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.runtime.kvcache import KVFormat
from memfit.strategies.precision import Precision, RecastLinears
from memfit.workload import Mode, Workload


class OptimizerKind(enum.Enum):
    """Optimizers a training workload can use."""

    ADAMW = "adamw"
    ADAMW_8BIT = "adamw-8bit"
    ADAFACTOR = "adafactor"
    SGD = "sgd"


class Parallelism(enum.Enum):
    """How training spreads over processes."""

    DDP = "ddp"
    FSDP = "fsdp"


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One run setting's token grammar: the field it sets, its documented forms and summary."""

    field: str
    name: str  # the key in recipe files, and in "uses ... twice" errors
    forms: str
    summary: str
    parse: Callable[[str], Any]  # token -> value, or None if the token is not this setting's
    token: Callable[[Any], str]
    plain: Callable[[Any], Any]  # value -> JSON
    typed: Callable[[Any], Any]  # JSON -> value
    saves: frozenset[str]  # the memory categories it shrinks in one process (tested)


def _enum_of(kind: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(token: str) -> Any:
        try:
            return kind(token)
        except ValueError:
            return None

    return parse


def _parse_accum(token: str) -> int | None:
    match = re.fullmatch(r"grad-accum-(\d+)", token)
    if match is None:
        return None
    if int(match.group(1)) < 1:
        raise RecipeError(f"recipe token {token!r} has no micro-batches", "use grad-accum-N with N >= 1")
    return int(match.group(1))


def _parse_autocast(token: str) -> Precision | None:
    match = re.fullmatch(r"(bf16|fp16)-autocast", token)
    return Precision(match.group(1)) if match else None


def _parse_kv(token: str) -> KVFormat | None:
    match = re.fullmatch(r"kv-(int8|int4)", token)
    return KVFormat(match.group(1)) if match else None


def _positive(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


SETTINGS = (
    _Setting("autocast", "autocast", "bf16-autocast|fp16-autocast",
             "training: the forward computes in bf16/fp16, weights stay as they are",
             _parse_autocast, lambda p: f"{p.value}-autocast", lambda p: p.value, Precision,
             frozenset({"activations"})),
    _Setting("optimizer", "optimizer", "adamw|adamw-8bit|adafactor|sgd",
             "training: the optimizer, and so the state it holds",
             _enum_of(OptimizerKind), lambda k: k.value, lambda k: k.value, OptimizerKind,
             frozenset({"optimizer_state"})),
    _Setting("micro_batches", "grad-accum", "grad-accum-N", "training: N micro-batches per optimizer step",
             _parse_accum, lambda n: f"grad-accum-{n}", int, _positive, frozenset({"activations"})),
    _Setting("parallelism", "distributed", "ddp|fsdp",
             "training over torchrun processes: data-parallel, or sharded with FSDP2",
             _enum_of(Parallelism), lambda k: k.value, lambda k: k.value, Parallelism,
             frozenset()),  # per rank, with several processes (tests/test_train_distributed.py)
    _Setting("kv_cache", "kv-cache", "kv-int8|kv-int4",
             "generation: the KV cache quantized to 8 or 4 bits (memfit's runtime; compiled decode step)",
             _parse_kv, lambda f: f.token, lambda f: f.value, KVFormat, frozenset({"kv_cache"})),
)
"""Every run setting's grammar, in the order tokens are written."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How a workload runs: optimizer, micro-batches, processes, autocast, KV-cache format.

    Args:
        optimizer: the optimizer; None means AdamW.
        micro_batches: micro-batches per optimizer step (``grad-accum-N``); None means 1.
        parallelism: ``ddp`` or ``fsdp`` over torchrun's processes; None in one process.
        autocast: the forward's compute format; None computes in the weights' dtype.
        kv_cache: generation's KV-cache quantization; None keeps keys and values in the dtype the
            model computes them in.
        master_weights: the optimizer steps fp32 master copies of low-precision parameters;
            derived from the plan's ``bf16-master`` (`memfit.plan.Plan.run`), never a token.
    """

    optimizer: OptimizerKind | None = None
    micro_batches: int | None = None
    parallelism: Parallelism | None = None
    autocast: Precision | None = None
    kv_cache: KVFormat | None = None
    master_weights: bool = False

    # -- tokens and recipe files -----------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        """The recipe tokens that `with_token` parses back into these settings."""
        return [s.token(getattr(self, s.field)) for s in SETTINGS if getattr(self, s.field) is not None]

    def with_token(self, token: str) -> RunSettings | None:
        """These settings plus ``token``, or None if ``token`` is no run setting's.

        Raises:
            RecipeError: the token's settings are invalid, or it sets what is already set.
        """
        for setting in SETTINGS:
            value = setting.parse(token)
            if value is None:
                continue
            if getattr(self, setting.field) is not None:
                raise RecipeError(
                    f"recipe uses {setting.name!r} twice ({token!r})", "keep one token per strategy or setting"
                )
            return dataclasses.replace(self, **{setting.field: value})
        return None

    def to_dict(self) -> dict[str, Any]:
        """The settings that are set, by recipe-file name (``{"optimizer": "sgd"}``)."""
        return {s.name: s.plain(getattr(self, s.field)) for s in SETTINGS if getattr(self, s.field) is not None}

    @classmethod
    def from_dict(cls, data: Any) -> RunSettings:
        """Inverse of `to_dict`; unknown keys and invalid values fail.

        Raises:
            RecipeError: an unknown key or an invalid value.
        """
        by_name = {s.name: s for s in SETTINGS}
        if not isinstance(data, dict) or set(data) - set(by_name):
            unknown = sorted(set(data) - set(by_name)) if isinstance(data, dict) else data
            raise RecipeError(f"unknown run setting(s) {unknown}", f"allowed: {sorted(by_name)}")
        try:
            return cls(**{by_name[k].field: by_name[k].typed(v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"invalid run settings: {exc}", "fix the recipe") from None

    # -- what the runners ask ---------------------------------------------------------------------
    def split(self, workload: Workload) -> tuple[int, int]:
        """``(sequences per micro-batch, micro-batches per step)`` of one rank.

        Raises:
            RecipeError: the batch does not split evenly over the ranks and micro-batches.
        """
        count = self.micro_batches or 1
        parts = workload.ranks * count
        if workload.batch_size % parts:
            raise RecipeError(
                f"batch {workload.batch_size} does not split into {workload.ranks} rank(s) x {count} micro-batch(es)",
                f"use a batch that is a multiple of {parts}",
            )
        return workload.batch_size // parts, count

    def build_optimizer(self, model: nn.Module, lr: float = 0.0) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (through fp32 masters with
        ``master_weights``). torch's optimizers run with ``foreach=False``: the per-parameter loop,
        whose temporaries are one parameter's size (the foreach path's depend on grouping)."""
        from memfit import optim

        params = [p for p in model.parameters() if p.requires_grad]
        kind = self.optimizer or OptimizerKind.ADAMW

        def build(group: list[nn.Parameter], rate: float) -> torch.optim.Optimizer:
            if kind is OptimizerKind.SGD:
                return torch.optim.SGD(group, lr=rate, momentum=0.9, foreach=False)
            if kind is OptimizerKind.ADAMW_8BIT:
                return optim.AdamW8bit(group, lr=rate)
            if kind is OptimizerKind.ADAFACTOR:
                return optim.Adafactor(group, lr=rate)
            return torch.optim.AdamW(group, lr=rate, foreach=False)

        if self.master_weights:
            return optim.MasterWeights(params, lambda ps, group: build(ps, group["lr"]), {"lr": lr})
        return build(params, lr)

    @contextlib.contextmanager
    def forward(self, device_type: str) -> Iterator[None]:
        """The context a forward runs in: autocast to ``autocast`` (Linears re-cast in backward),
        or nothing."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(device_type=device_type, dtype=self.autocast.dtype), RecastLinears():
            yield


def settings_space(workload: Workload) -> list[RunSettings]:
    """The run settings the planner tries for ``workload``: for generation each KV-cache format; for
    training bf16 autocast, each memory-lean optimizer, two micro-batches for an even batch, DDP and
    FSDP over several ranks; none for the weights alone."""
    if workload.mode is Mode.GENERATE:
        return [RunSettings(kv_cache=kind) for kind in KVFormat]
    if workload.mode is not Mode.TRAIN:
        return []
    options = [RunSettings(autocast=Precision.BF16)]
    lean = (OptimizerKind.ADAMW_8BIT, OptimizerKind.ADAFACTOR, OptimizerKind.SGD)
    options += [RunSettings(optimizer=kind) for kind in lean]
    if workload.batch_size % 2 == 0:
        options.append(RunSettings(micro_batches=2))
    if workload.ranks > 1:
        options += [RunSettings(parallelism=kind) for kind in Parallelism]
    return options


def setting_examples() -> list[str]:
    """Example tokens of every run setting, for error messages."""
    return ["bf16-autocast", "adamw-8bit", "adafactor", "sgd", "grad-accum-2", "ddp", "fsdp", "kv-int8", "kv-int4"]


def setting_families() -> list[tuple[str, str]]:
    """``(forms, summary)`` of every run setting, for ``--help``."""
    return [(s.forms, s.summary) for s in SETTINGS]
