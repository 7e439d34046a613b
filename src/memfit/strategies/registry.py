"""The strategy registry: recipe strings become typed strategies here, and nowhere else.

Each strategy class registers once, explicitly (`strategies/__init__.py` imports every module).
A recipe token is offered to every registered class's `from_token`; exactly one must accept it.
"""

from __future__ import annotations

from typing import Any

from memfit.errors import RecipeError
from memfit.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy class to the registry.

    Raises:
        ValueError: another class already uses the same ``name``.
    """
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy name {cls.name!r} is registered twice: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_classes() -> list[type[Strategy]]:
    """All registered strategy classes, in registration order."""
    return list(_REGISTRY.values())


def known_tokens() -> list[str]:
    """Example tokens of every registered strategy, for error messages and `--help`."""
    return [example.token for cls in _REGISTRY.values() for example in cls.examples()]


def parse_token(token: str) -> Strategy:
    """Turn one recipe token (``"int4-g128"``) into a strategy.

    Raises:
        RecipeError: no registered strategy accepts the token.
    """
    token = token.strip().lower()
    for cls in _REGISTRY.values():
        strategy = cls.from_token(token)
        if strategy is not None:
            return strategy
    raise RecipeError(
        f"unknown recipe token {token!r}",
        f"known tokens: {', '.join(known_tokens())} (run `memfit validate --help`)",
    )


def strategy_from_dict(data: dict[str, Any]) -> Strategy:
    """Build a strategy from its recipe dictionary (``{"strategy": name, "version": n, ...}``).

    Raises:
        RecipeError: the name is unknown or the settings are invalid.
    """
    if not isinstance(data, dict) or "strategy" not in data:
        raise RecipeError(f"recipe entry {data!r} has no 'strategy' key", 'write {"strategy": "int8"}')
    cls = _REGISTRY.get(data["strategy"])
    if cls is None:
        raise RecipeError(f"unknown strategy {data['strategy']!r}", f"known strategies: {', '.join(_REGISTRY)}")
    return cls.from_dict(data)
