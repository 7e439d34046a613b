"""Text for evaluation and calibration, and token windows cut from it.

The built-in text is CPython's own English prose: the values of ``pydoc_data.topics.topics`` with
the keys sorted, joined (about 465k characters, 113k SmolLM2 tokens). It is split at a line break
near the middle into an evaluation part (the first half) and a calibration part (the second half),
which never overlap, so calibrated methods are never scored on the text they were fitted to.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from memfit.errors import DataError


@functools.lru_cache(maxsize=1)
def builtin_text() -> str:
    """The whole built-in text (keys sorted, values joined)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def _split_at() -> int:
    text = builtin_text()
    middle = len(text) // 2
    cut = text.find("\n", middle)
    return middle if cut < 0 else cut + 1


def eval_text() -> str:
    """The evaluation part of the built-in text (first half)."""
    return builtin_text()[: _split_at()]


def calibration_text() -> str:
    """The calibration part of the built-in text (second half); disjoint from `eval_text`."""
    return builtin_text()[_split_at() :]


def read_text(path: str | Path) -> str:
    """Read a user's UTF-8 text file.

    Raises:
        DataError: the file is missing, unreadable or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist", "pass an existing UTF-8 text file with --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {str(path)!r} is not UTF-8 ({exc.reason})", "convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"text file {str(path)!r} is empty", "pass a file with text in it")
    return text


def token_windows(tokenizer, text: str, num_tokens: int, window: int) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of ``window`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (special tokens are not added).
        num_tokens: tokens wanted; rounded down to whole windows, and capped at what the text has.
        window: tokens per window.

    Returns:
        LongTensor [num_windows, window].

    Raises:
        DataError: the text has fewer than ``window`` tokens, or ``num_tokens < window``.
    """
    if num_tokens < window:
        raise DataError(f"{num_tokens} tokens is less than one window of {window}", f"ask for at least {window}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    num_windows = min(num_tokens, len(ids)) // window
    if num_windows == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}", "pass a longer text"
        )
    return torch.tensor(ids[: num_windows * window], dtype=torch.long).view(num_windows, window)


CALIBRATION_WINDOWS = 32
CALIBRATION_WINDOW = 512


def calibration_windows(
    tokenizer, text: str | None = None, windows: int = CALIBRATION_WINDOWS, window: int = CALIBRATION_WINDOW
) -> torch.Tensor:
    """Token windows [windows, window] for calibration, from ``text`` or the built-in calibration
    half (never the evaluation half).

    Example:
        >>> memfit.apply(model, "int4-g128-gptq", memfit.Context(calibration=calibration_windows(tokenizer)))
    """
    return token_windows(tokenizer, calibration_text() if text is None else text, windows * window, window)
