"""The one module matcher every strategy uses: fqn globs (or ``re:`` patterns) to include and exclude.

Mirrors peft's ``target_modules``/``exclude_modules`` and llm-compressor's ``targets``/``ignore``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re

from memfit.strategies.base import register_field_type


@register_field_type
@dataclasses.dataclass(frozen=True, kw_only=True)
class Targets:
    """Which modules a strategy touches, by fully qualified name (``model.layers.0.mlp.up_proj``).

    Args:
        include: globs (``"*mlp*"``) or regexes (``"re:.*layers\\.[0-3]\\..*"``); a module must match one.
        exclude: patterns of the same kinds; a module matching any is left alone. Exclude the
            embedding and output head (``"lm_head"``, ``"*embed_tokens"``) to keep them in float.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for pattern in self.include + self.exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regex in targets {pattern!r}: {exc}") from None

    def matches(self, fqn: str) -> bool:
        """True if ``fqn`` matches an include pattern and no exclude pattern."""
        return any(_match(p, fqn) for p in self.include) and not any(_match(p, fqn) for p in self.exclude)


def _match(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern)
