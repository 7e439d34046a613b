"""Plans: a workload, an ordered tuple of strategies and the run settings; recipes; `apply`.

A `Plan` is written by users as a recipe string of comma-separated tokens
(``"int4-g128,lora-8,adamw-8bit"``) or as a JSON/YAML file, and round-trips through both. Strings
become typed objects in two places only: strategies (what the model becomes) in
`memfit.strategies.registry`, run settings (how a workload runs: optimizer, micro-batches,
processes, autocast) in `memfit.settings`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from memfit.errors import RecipeError
from memfit.settings import RunSettings, setting_examples
from memfit.strategies.base import Strategy
from memfit.strategies.registry import parse_token, strategy_from_dict
from memfit.strategies.training import MasterWeights
from memfit.workload import Context, Mode, ProgressFn, Workload

__all__ = ["Context", "Mode", "Plan", "ProgressFn", "Workload", "apply"]

RECIPE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """A workload, an ordered tuple of strategies, and the run settings.

    Build one with `Plan.parse` (a recipe string or file) or directly; `validate` orders the
    strategies by phase and rejects conflicting combinations. `apply` applies the strategies;
    the settings reach the runners explicitly through `run`.

    Example:
        >>> Plan.parse("bf16,int8").recipe
        'int8,bf16'
        >>> Plan.parse("lora-8,sgd").run.optimizer
        <OptimizerKind.SGD: 'sgd'>
    """

    strategies: tuple[Strategy, ...] = ()
    workload: Workload = Workload()
    settings: RunSettings = RunSettings()

    @property
    def run(self) -> RunSettings:
        """The run settings the workload runner and `memfit.train` take: the recipe's settings,
        plus what its strategies imply (``bf16-master`` steps through fp32 master copies)."""
        master = any(isinstance(s, MasterWeights) for s in self.strategies)
        return dataclasses.replace(self.settings, master_weights=master)

    @property
    def is_empty(self) -> bool:
        """True for ``none``: no strategy and the default run settings (the model as it is)."""
        return not self.strategies and self.settings == RunSettings()

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
        """The plan as a recipe string (strategies, then run settings); ``"none"`` for the empty plan."""
        return ",".join([s.token for s in self.strategies] + self.settings.tokens) or "none"

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
        tokens = [t.strip().lower() for t in text.split(",") if t.strip() and t.strip().lower() != "none"]
        settings, strategies = RunSettings(), []
        for token in tokens:
            with_setting = settings.with_token(token)
            if with_setting is None:
                strategies.append(parse_token(token, also_known=tuple(setting_examples())))
            else:
                settings = with_setting
        return cls(tuple(strategies), workload or Workload(), settings).validate()

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
        """``{"version": 1, "workload": {...}, "strategies": [{"strategy": ..., ...}, ...],
        "settings": {...}}`` (``settings`` only when any is set)."""
        data = {
            "version": RECIPE_FORMAT_VERSION,
            "workload": self.workload.to_dict(),
            "strategies": [s.to_dict() for s in self.strategies],
        }
        if self.settings.to_dict():
            data["settings"] = self.settings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}", "see `memfit validate`")
        unknown = sorted(set(data) - {"version", "workload", "strategies", "settings"})
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}", "allowed: version, workload, strategies, settings")
        if data.get("version", RECIPE_FORMAT_VERSION) != RECIPE_FORMAT_VERSION:
            raise RecipeError(
                f"recipe format version {data['version']} is not {RECIPE_FORMAT_VERSION}",
                "write the recipe again with this memfit version",
            )
        entries = data.get("strategies", [])
        if not isinstance(entries, list):
            raise RecipeError("recipe 'strategies' must be a list", 'write strategies: [{"strategy": "int8"}]')
        settings = RunSettings.from_dict(data.get("settings") or {})
        strategies = []
        for entry in entries:
            legacy = _legacy_setting_token(entry)
            if legacy is None:
                strategies.append(strategy_from_dict(entry))
            else:
                updated = settings.with_token(legacy)
                if updated is None:
                    raise RecipeError(f"invalid run setting in recipe entry {entry!r}", "fix the recipe")
                settings = updated
        workload = Workload.from_dict(data.get("workload") or {})
        return cls(tuple(strategies), workload, settings).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Run settings were strategy entries in recipe files written before they became settings.
_LEGACY_SETTINGS = {
    "optimizer": lambda e: e.get("kind", "adamw"),
    "grad-accum": lambda e: f"grad-accum-{e.get('steps', 2)}",
    "distributed": lambda e: e.get("kind", "ddp"),
    "autocast": lambda e: f"{e.get('precision', 'bf16')}-autocast",
}


def _legacy_setting_token(entry: Any) -> str | None:
    """The token of a run setting written as a strategy entry (``{"strategy": "optimizer", "kind": "sgd"}``)."""
    if not isinstance(entry, dict) or entry.get("strategy") not in _LEGACY_SETTINGS:
        return None
    return str(_LEGACY_SETTINGS[entry["strategy"]](entry))


def apply(model: Any, plan: Plan | str, ctx: Context | None = None) -> Any:
    """Apply ``plan``'s strategies to ``model`` in place, in phase order, and return the model.

    Works on real and on meta tensors alike (that is how `estimate` predicts). The applied
    strategies accumulate on ``model.memfit_plan`` so `save` can record them and `load` can rebuild
    the modules; ``plan``'s run settings are not the model's and are not recorded there (those the
    model already records, such as the KV-cache format `memfit.optimize` chose, are kept).

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
    combined = Plan(previous.strategies + plan.strategies, plan.workload, previous.settings).validate()
    for strategy in plan.strategies:
        strategy.apply(model, ctx)
    strategies = tuple(ctx.resolved.get(s, s) for s in combined.strategies)
    model.memfit_plan = dataclasses.replace(combined, strategies=strategies)
    return model
