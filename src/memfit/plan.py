"""Workload, Plan and Context: what to run, which strategies to apply, and what applying may use.

A `Plan` is a workload plus an ordered tuple of strategies. It is written by users as a recipe
string of comma-separated tokens (``"int4-g128,bf16"``) or as a JSON/YAML file, and round-trips
through both. Strings become typed strategies only in `strategies.registry`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from memfit.errors import RecipeError
from memfit.strategies.base import Strategy
from memfit.strategies.registry import parse_token, strategy_from_dict

RECIPE_FORMAT_VERSION = 1


class Mode(enum.Enum):
    """What the model is used for: memory differs a lot between the three."""

    INFER = "infer"
    GENERATE = "generate"
    TRAIN = "train"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """The work a plan must fit: mode, batch size, sequence length, new tokens, device.

    Args:
        mode: inference forward, generation with a KV cache, or a training step.
        batch_size: sequences per step.
        seq_len: tokens per sequence (the prompt, for generation).
        new_tokens: tokens generated after the prompt (generation only).
        device: where the model runs (``"cpu"``, ``"cuda"``).
        ranks: processes a training batch is split over (``ddp``/``fsdp``); reports are per rank.
    """

    mode: Mode = Mode.INFER
    batch_size: int = 1
    seq_len: int = 512
    new_tokens: int = 0
    device: str = "cpu"
    ranks: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1 or self.new_tokens < 0 or self.ranks < 1:
            raise ValueError(f"invalid workload sizes: {self}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mode": self.mode.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown workload key(s) {unknown}", f"allowed: {sorted(known)}")
        try:
            return cls(**{**data, "mode": Mode(data.get("mode", "infer"))})
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"invalid workload: {exc}", "fix the recipe's workload") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A workload plus an ordered tuple of strategies.

    Build one with `Plan.parse` (a recipe string or file) or directly; `validate` orders the
    strategies by phase and rejects conflicting combinations.

    Example:
        >>> Plan.parse("bf16,int8").recipe
        'int8,bf16'
    """

    strategies: tuple[Strategy, ...] = ()
    workload: Workload = Workload()

    def validate(self) -> Plan:
        """Return the plan with strategies sorted by phase; raise on conflicts or duplicates.

        Raises:
            RecipeError: two strategies of the same kind, or a declared conflict.
        """
        ordered = tuple(sorted(self.strategies, key=lambda s: (s.phase, s.order)))  # stable otherwise
        names = [s.name for s in ordered]
        for strategy in ordered:
            if names.count(strategy.name) > 1:
                raise RecipeError(
                    f"recipe {self.recipe!r} uses {strategy.name!r} twice", "keep one token per strategy"
                )
            clash = [n for n in names if n in strategy.conflicts]
            if clash:
                raise RecipeError(
                    f"recipe {self.recipe!r} combines {strategy.token!r} with {clash[0]!r}, which conflict",
                    "keep one of them",
                )
        return dataclasses.replace(self, strategies=ordered)

    @property
    def needs_calibration(self) -> bool:
        """True if a strategy needs calibration windows in `Context.calibration`."""
        return any(s.needs_calibration for s in self.strategies)

    @property
    def recipe(self) -> str:
        """The plan as a recipe string; ``"none"`` for the empty plan."""
        return ",".join(s.token for s in self.strategies) or "none"

    # -- recipes ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Path, workload: Workload | None = None) -> Plan:
        """Parse a recipe string (``"int4-g128,bf16"``), or a ``.json``/``.yaml``/``.yml`` file.

        Raises:
            RecipeError: an unknown token or key, an unreadable file, or conflicting strategies.
        """
        text = str(text).strip()
        if text.endswith((".json", ".yaml", ".yml")):
            return cls.from_file(Path(text))
        tokens = [t for t in text.split(",") if t.strip() and t.strip().lower() != "none"]
        strategies = tuple(parse_token(t) for t in tokens)
        return cls(strategies, workload or Workload()).validate()

    @classmethod
    def from_file(cls, path: Path) -> Plan:
        """Read a JSON or YAML recipe file written by `to_json`/`to_yaml` (or by hand)."""
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist", "check the path")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            first_line = str(exc).splitlines()[0]
            raise RecipeError(f"cannot parse recipe file {str(path)!r}: {first_line}", "fix its syntax") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """``{"version": 1, "workload": {...}, "strategies": [{"strategy": ..., ...}, ...]}``."""
        return {
            "version": RECIPE_FORMAT_VERSION,
            "workload": self.workload.to_dict(),
            "strategies": [s.to_dict() for s in self.strategies],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}", "see `memfit validate`")
        unknown = sorted(set(data) - {"version", "workload", "strategies"})
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}", "allowed: version, workload, strategies")
        if data.get("version", RECIPE_FORMAT_VERSION) != RECIPE_FORMAT_VERSION:
            raise RecipeError(
                f"recipe format version {data['version']} is not {RECIPE_FORMAT_VERSION}",
                "write the recipe again with this memfit version",
            )
        entries = data.get("strategies", [])
        if not isinstance(entries, list):
            raise RecipeError("recipe 'strategies' must be a list", 'write strategies: [{"strategy": "int8"}]')
        strategies = tuple(strategy_from_dict(e) for e in entries)
        workload = Workload.from_dict(data.get("workload") or {})
        return cls(strategies, workload).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


ProgressFn = Callable[[str, int, int], None]
"""``progress(description, completed, total)``: called as long work advances."""


@dataclasses.dataclass
class Context:
    """What a strategy may use while it applies: calibration data, device, progress, notes.

    Args:
        calibration: token batches (``LongTensor [B, T]``) for calibrated methods.
        source: a `memfit.calibration.stream.CheckpointSource` when the model's weights are still
            on the meta device and are read layer by layer as calibration reaches them.
        device: where new tensors go.
        progress: progress callback; the CLI draws a bar on stderr.
        notes: what strategies report doing beyond their settings (for example a group size
            shrunk to fit a layer); shown to the user and saved with the model.
    """

    calibration: Sequence[Any] | None = None
    source: Any = None
    device: str = "cpu"
    progress: ProgressFn | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    resolved: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def resolve(self, strategy: Any, resolved: Any) -> None:
        """Record that ``strategy`` settled choices it makes on data (mixed-bits' widths) as
        ``resolved``, which `apply` records in the model's plan so a saved model rebuilds exactly."""
        self.resolved[strategy] = resolved

    def calibration_for(self, label: str) -> Sequence[Any]:
        """The calibration windows, for ``label`` (a recipe token) that needs them.

        Raises:
            RecipeError: there are none.
        """
        if self.calibration is None:
            raise RecipeError(
                f"{label} needs calibration text",
                "memfit compress and optimize supply it; in Python pass "
                "memfit.Context(calibration=memfit.calibration.calibration_windows(tokenizer))",
            )
        return self.calibration

    def report(self, description: str, completed: int, total: int) -> None:
        if self.progress is not None:
            self.progress(description, completed, total)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def apply(model: Any, plan: Plan | str, ctx: Context | None = None) -> Any:
    """Apply ``plan``'s strategies to ``model`` in place, in phase order, and return the model.

    Works on real and on meta tensors alike (that is how `estimate` predicts). The applied plan
    accumulates on ``model.memfit_plan`` so `save` can record it and `load` can rebuild the modules.

    Args:
        model: a model from `memfit.load` (or any ``nn.Module`` for precision-only plans).
        plan: a `Plan` or a recipe string such as ``"int4-g128"``.
        ctx: calibration data, device and progress callback; a default one if omitted.

    Raises:
        RecipeError: the recipe is invalid, or repeats a strategy the model already has.

    Example:
        >>> model, tokenizer = memfit.load("tiny-llama")
        >>> memfit.apply(model, "int8")
    """
    plan = Plan.parse(plan) if isinstance(plan, str) else plan.validate()
    ctx = ctx or Context()
    previous = getattr(model, "memfit_plan", None) or Plan()
    combined = Plan(previous.strategies + plan.strategies, plan.workload).validate()
    for strategy in plan.strategies:
        strategy.apply(model, ctx)
    strategies = tuple(ctx.resolved.get(s, s) for s in combined.strategies)
    model.memfit_plan = dataclasses.replace(combined, strategies=strategies)
    return model
