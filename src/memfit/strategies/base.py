"""The `Strategy` base class: a frozen, typed configuration with one `apply`.

A strategy holds settings only. Whatever it computes while applying (statistics, masks, hook
handles) lives in the `Context` or in the modules it creates, so two applications of the same
strategy object never interfere.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from memfit.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memfit.workload import Context, Workload


class Phase(enum.IntEnum):
    """When a strategy runs inside a plan: structure changes first, runtime wiring last.

    Quantization runs before precision casting so weights are rounded from their original values
    and the cast only touches what quantization left in floating point (norms, biases).
    """

    STRUCTURE = 0
    QUANTIZE = 1
    PRECISION = 2
    RUNTIME = 3


class Recovery(enum.Enum):
    """What training (distillation from the unchanged model) can adjust to win back what a strategy cost."""

    NONE = "none"  # lossless, or it changes how a run goes, not the weights
    WEIGHTS = "weights"  # the weights it leaves are plain floats: they train (pruned, dropped, factored)
    ADAPTERS = "adapters"  # its weights are packed and frozen: LoRA adapters beside them train


RECOVERY_BY_PHASE = {Phase.STRUCTURE: Recovery.WEIGHTS, Phase.QUANTIZE: Recovery.ADAPTERS}


@dataclasses.dataclass(frozen=True)
class BlockOption:
    """One way to hold a single block's Linears (a decoder layer's attention projections, or its
    MLP), declared by a strategy (`Strategy.block_options`) for plans that choose per block:
    mixed bit-widths and the planner's fast path.

    Args:
        token: the choice as a recipe records it (``"int4-g64"``, ``"int8"``, ``"float"``).
        fake: the weight [N, K] as this option rounds it, in fp32, to score a block's error;
            None if the option keeps the weight as it is.
        nbytes: the bytes one ``nn.Linear``'s weight holds in this option.
        make: the Linear in this option, given the Linear and a calibration Hessian (GPTQ codes)
            or None (round to nearest).
    """

    token: str
    fake: Callable[[torch.Tensor], torch.Tensor] | None
    nbytes: Callable[[nn.Linear], int]
    make: Callable[[nn.Linear, torch.Tensor | None], nn.Module]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """Base class of every memory-saving strategy.

    Subclasses are frozen keyword-only dataclasses that set the class attributes below, check their
    fields in ``__post_init__`` (raising `ValueError`), and implement `apply`, `token`,
    `from_token` and `examples`.

    Class attributes:
        name: the key in JSON/YAML recipes.
        phase: where the strategy sits in a plan (see `Phase`).
        version: bumped when a field's meaning changes; recipes must match it.
        conflicts: names of strategies that cannot share a plan with this one.
        sqnr_floor_db: the lowest output SQNR (dB) the conformance suite accepts on tiny models;
            ``None`` for lossless strategies, whose outputs must be bit-identical.
        saves: the memory categories (`memfit.memory.CATEGORIES`) the strategy shrinks; the
            conformance suite checks that the bytes of each fall.
        order: position within the phase (structure changes: layers are dropped before heads and
            MLP channels are pruned, and those before single Linears are factored or sparsified).
        in_config: the change is written into the model's config (fewer layers, heads or channels),
            so a model rebuilt from a saved config already has it and loading skips it.
        train_only: the strategy only changes how training runs (optimizer, accumulation,
            checkpointing, processes), not the model a saved directory holds; loading skips it.
        exportable: the layers it makes are ones other formats describe (packed integers, plain
            Linears); False for memfit's own layouts (kept values plus a bitmask, low-rank
            factors), which `memfit.export` refuses before any work.
        recovery: what distillation trains to recover its loss (`Recovery`; by default by phase:
            structure changes leave trainable floats, quantization frozen packed weights, casts
            and run settings nothing to recover).
        forms: the token grammar, as documented (``int4-gN[-awq][-gptq]``): placeholders in
            capitals, optional parts in brackets, alternatives separated by ``|``.
        summary: one line on what it does, for ``--help`` and error messages.
    """

    name: ClassVar[str]
    phase: ClassVar[Phase]
    version: ClassVar[int] = 1
    conflicts: ClassVar[tuple[str, ...]] = ()
    sqnr_floor_db: ClassVar[float | None] = None
    saves: ClassVar[frozenset[str]] = frozenset({"parameters"})
    order: ClassVar[int] = 0
    in_config: ClassVar[bool] = False
    train_only: ClassVar[bool] = False
    exportable: ClassVar[bool] = True
    recovery: ClassVar[Recovery | None] = None  # None: `RECOVERY_BY_PHASE`
    forms: ClassVar[str]
    summary: ClassVar[str]

    @classmethod
    def recovers(cls) -> Recovery:
        """What distillation trains after this strategy (see `recovery`)."""
        return cls.recovery or RECOVERY_BY_PHASE.get(cls.phase, Recovery.NONE)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Change ``model`` in place and return it. Must also work on meta tensors."""
        raise NotImplementedError

    @property
    def token(self) -> str:
        """The recipe token that `from_token` parses back into this strategy."""
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        """True if applying needs calibration token windows in ``Context.calibration``."""
        return False

    @classmethod
    def from_token(cls, token: str) -> Strategy | None:
        """Parse a recipe token, or return ``None`` if the token is not this class's."""
        raise NotImplementedError

    @classmethod
    def examples(cls) -> list[Strategy]:
        """Instances the conformance suite runs; also the planner's default option grid."""
        raise NotImplementedError

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        """The options the planner tries for ``workload``; by default the `examples`."""
        return cls.examples()

    @property
    def resolves(self) -> bool:
        """True if applying it to real weights settles choices that it records in the model's plan
        (`Context.resolve`: mixed-bits' widths, low-rank energy mode's ranks); a prediction made
        before that is approximate, one from the recorded plan exact."""
        return False

    @property
    def uniform_block(self) -> str | None:
        """The `BlockOption` token this strategy holds every decoder block in (``"int8"``,
        ``"int4-g64"``), whatever its method, so the planner predicts its divergence from per-block
        scores; None if it holds blocks otherwise."""
        return None

    @classmethod
    def block_options(cls) -> list[BlockOption]:
        """The ways this strategy can hold one block of Linears by itself (`BlockOption`), for
        plans that choose per block; by default none."""
        return []

    @classmethod
    def budget_options(cls, model: nn.Module, budget_bytes: int, workload: Workload) -> list[Strategy]:
        """Options sized to a budget (mixed-bits sets its bits from it); by default none."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """``{"strategy": name, "version": n, **fields}``, with enums as their values."""
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"strategy": self.name, "version": self.version, **fields}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Strategy:
        """Inverse of `to_dict`; unknown keys and a different version fail."""
        data = dict(data)
        data.pop("strategy", None)
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise RecipeError(
                f"strategy {cls.name!r} has version {version} in the recipe, memfit has {cls.version}",
                "write the recipe again with this memfit version",
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(
                f"unknown setting(s) {unknown} for strategy {cls.name!r}",
                f"allowed: {sorted(known)}",
            )
        try:
            kwargs = {key: _typed(cls.__dataclass_fields__[key].type, value) for key, value in data.items()}
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"invalid settings for strategy {cls.name!r}: {exc}", "fix the recipe") from None


# Field types (enums, small frozen dataclasses) by annotation string, filled by
# `register_field_type`, so `from_dict` rebuilds typed fields without evaluating annotations.
_FIELD_TYPES: dict[str, type] = {}


def register_field_type(field_type: type) -> type:
    """Let strategy fields annotated with ``field_type`` (an enum or a dataclass) round-trip."""
    _FIELD_TYPES[field_type.__name__] = field_type
    return field_type


def _typed(annotation: Any, value: Any) -> Any:
    field_type = _FIELD_TYPES.get(annotation) if isinstance(annotation, str) else None
    if field_type is None or isinstance(value, field_type):
        return value
    if issubclass(field_type, enum.Enum):
        return field_type(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping for {field_type.__name__}, got {value!r}")
    return field_type(**value)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
