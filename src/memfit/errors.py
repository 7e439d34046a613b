"""memfit's user-facing errors.

Every error a user can cause (a missing model, an unknown recipe token, a budget that cannot be met,
a corrupt checkpoint) is a `MemfitError`: a one-line message saying what was given and what is
allowed, plus a hint saying what to do next. The CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations


class MemfitError(Exception):
    """Base class of every error memfit raises for bad input.

    Args:
        message: what was given and why it cannot be used.
        hint: what to do next (optional).
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)


class ModelNotFoundError(MemfitError):
    """The model reference names no directory, file, built-in model or reachable hub id."""


class RecipeError(MemfitError):
    """A recipe token, recipe file or strategy setting is unknown or invalid."""


class BudgetError(MemfitError):
    """No candidate plan fits the memory budget, or the budget cannot be parsed."""


class CheckpointError(MemfitError):
    """A saved model is missing files, holds unexpected tensors or fails its checks."""


class DataError(MemfitError):
    """Evaluation or calibration text is missing or too short."""


class OutputError(MemfitError):
    """The output directory cannot be written without losing data."""
