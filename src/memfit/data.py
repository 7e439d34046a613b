"""Text for evaluation and calibration, and token windows cut from it.

The built-in text is CPython's own English prose: the values of ``pydoc_data.topics.topics`` with
the keys sorted, joined (about 465k characters, 113k SmolLM2 tokens). It is split at a line break
near the middle into an evaluation part (the first half) and a calibration part (the second half),
which never overlap, so calibrated methods are never scored on the text they were fitted to.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
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
    ids = _encode(tokenizer, text)
    num_windows = min(num_tokens, len(ids)) // window
    if num_windows == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}", "pass a longer text"
        )
    return ids[: num_windows * window].view(num_windows, window).clone()


# Encoded texts by (tokenizer, text) fingerprint: evaluation and calibration encode the same text
# with the same tokenizer again and again (the planner twice per candidate), and encoding the
# built-in half costs more than evaluating a small model on a few windows of it.
_ENCODED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_ENCODED_ENTRIES = 4  # the evaluation and calibration halves of two tokenizers; 1 MB each for the demo


def _encode(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text)``'s ids without special tokens, as a LongTensor (read-only: callers copy)."""
    key = _fingerprint(tokenizer, text)
    ids = _ENCODED.get(key) if key else None
    if ids is None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if key:
            _ENCODED[key] = ids
            while len(_ENCODED) > _ENCODED_ENTRIES:
                _ENCODED.popitem(last=False)
    else:
        _ENCODED.move_to_end(key)
    return ids


def _fingerprint(tokenizer, text: str) -> tuple[str, str] | None:
    # A fast tokenizer's whole state is its backend's JSON; the Python-side switch that changes
    # encoding is split_special_tokens. Other tokenizers are not cached.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    state = f"{type(tokenizer).__qualname__}|{getattr(tokenizer, 'split_special_tokens', None)}|{backend.to_str()}"
    return hashlib.sha256(state.encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest()


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
