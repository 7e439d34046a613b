"""The strategy registry: recipe strings become typed strategies here, and nowhere else.

Each strategy class registers once, explicitly (`strategies/__init__.py` imports every module),
and declares its token grammar (`Strategy.forms`) and a one-line `Strategy.summary`. A recipe token
is offered to every registered class's `from_token`; exactly one may claim it (return a strategy,
or raise a `RecipeError` about its settings), which `parse_token` checks on every call and
``tests/test_strategies.py`` checks for every documented token.
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
    missing = [attr for attr in ("forms", "summary") if not isinstance(getattr(cls, attr, None), str)]
    if missing:
        raise ValueError(f"strategy {cls.__name__} declares no {' or '.join(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def strategy_classes() -> list[type[Strategy]]:
    """All registered strategy classes, in registration order."""
    return list(_REGISTRY.values())


def known_tokens() -> list[str]:
    """Example tokens of every registered strategy, for error messages and `--help`."""
    return [example.token for cls in _REGISTRY.values() for example in cls.examples()]


def token_families() -> list[tuple[str, str]]:
    """``(forms, summary)`` of every registered strategy, in plan order (phase), for ``--help``."""
    ordered = sorted(_REGISTRY.values(), key=lambda cls: (cls.phase, cls.order))  # stable: registration order
    return [(cls.forms, cls.summary) for cls in ordered]


def claims(token: str) -> list[tuple[type[Strategy], Strategy | RecipeError]]:
    """Every registered class that claims ``token``, with what its `from_token` gave: the strategy,
    or the `RecipeError` it raised about the token's settings (``int4-g100``)."""
    found: list[tuple[type[Strategy], Strategy | RecipeError]] = []
    for cls in _REGISTRY.values():
        try:
            strategy = cls.from_token(token)
        except RecipeError as exc:
            found.append((cls, exc))
            continue
        if strategy is not None:
            found.append((cls, strategy))
    return found


def parse_token(token: str, also_known: tuple[str, ...] = ()) -> Strategy:
    """Turn one recipe token (``"int4-g128"``) into a strategy.

    Args:
        also_known: other tokens the caller accepts (run settings), named in the error.

    Raises:
        RecipeError: no registered strategy accepts the token, or the one that claims it rejects
            its settings.
    """
    token = token.strip().lower()
    found = claims(token)
    if len(found) > 1:  # a bug in memfit's grammars, not in the recipe
        raise AssertionError(f"recipe token {token!r} is claimed by {[cls.__name__ for cls, _ in found]}")
    if found:
        result = found[0][1]
        if isinstance(result, RecipeError):
            raise result
        return result
    raise RecipeError(
        f"unknown recipe token {token!r}",
        f"known tokens: {', '.join(known_tokens() + list(also_known))} (run `memfit validate --help`)",
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
