"""Byte sizes as humans write them, and nothing else.

Inside memfit every size is an `int` of bytes named `*_bytes`; human units exist only here and in
the CLI. Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB)
powers of 1024, as `ls --si` and `ls -h` disagree about.
"""

from __future__ import annotations

import re

from memfit.errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse a size such as ``"60MB"``, ``"1.5GiB"`` or ``"123456"`` into bytes.

    Raises:
        BudgetError: the text is not a number followed by a known unit.

    Example:
        >>> parse_bytes("1.5GiB")
        1610612736
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise BudgetError(
            f"cannot read size {text!r}",
            "write a number with a unit such as 60MB, 1.5GiB or 25% (of the original weights)",
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_budget(text: str, reference_bytes: int) -> int:
    """Parse a budget: a size (``"60MB"``) or a percentage of ``reference_bytes`` (``"25%"``).

    Raises:
        BudgetError: unreadable, zero or negative.
    """
    text = text.strip()
    if text.endswith("%"):
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise BudgetError(f"cannot read budget {text!r}", "write e.g. 25% or 60MB") from None
        budget_bytes = int(fraction * reference_bytes)
    else:
        budget_bytes = parse_bytes(text)
    if budget_bytes <= 0:
        raise BudgetError(f"budget {text!r} is not positive", "give a positive size such as 60MB or 25%")
    return budget_bytes


def format_bytes(num_bytes: int) -> str:
    """Format bytes with a decimal unit and three significant digits: ``85300000 -> "85.3 MB"``."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 999.5 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
