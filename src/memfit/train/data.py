"""Training batches: token windows of the text in a seeded order that depends only on the step.

Batch ``step`` of a run is a pure function of (text, seq, seed, batch, step): a resumed run and a
run split over ranks read exactly the sequences an uninterrupted single-process run reads. Rank
``r`` of ``R`` takes rows ``r * B / R .. (r + 1) * B / R`` of the global batch, and micro-batch
``i`` of ``N`` the ``i``-th slice of that.
"""

from __future__ import annotations

import hashlib

import torch

from memfit.data import calibration_text, read_text, token_windows

BUILTIN = "builtin"


class TokenWindows:
    """Non-overlapping windows of ``seq`` tokens, visited in a fresh seeded permutation per epoch.

    Args:
        windows: LongTensor [num_windows, seq].
        seed: seeds the visiting order.
    """

    def __init__(self, windows: torch.Tensor, seed: int) -> None:
        self.windows = windows
        self.seed = seed
        self._orders: dict[int, list[int]] = {}
        self._order(0)  # made now, not inside the first (tracked) step

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def fingerprint(self) -> str:
        """A hash of the token ids (checkpoints refuse to resume on different data)."""
        return hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:16]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self), generator=generator).tolist()}
        return self._orders[epoch]

    def rows(self, step: int, batch: int, part: int = 0, parts: int = 1) -> list[int]:
        """The window indices of rows ``part * batch / parts ..`` of global batch ``step``."""
        size = batch // parts
        first = step * batch + part * size
        rows = []
        for index in range(first, first + size):
            epoch, offset = divmod(index, len(self))
            rows.append(self._order(epoch)[offset])
        return rows

    def batch(self, step: int, batch: int, part: int = 0, parts: int = 1) -> torch.Tensor:
        """Rows ``part * batch / parts ..`` of global batch ``step``: LongTensor [batch / parts, seq]."""
        return self.windows[self.rows(step, batch, part, parts)]


def training_windows(tokenizer, data: str | None, seq: int, seed: int) -> TokenWindows:
    """`TokenWindows` of ``data`` (a UTF-8 file path, or None / ``"builtin"`` for the built-in
    calibration half, disjoint from the evaluation half).

    Raises:
        DataError: the file is missing, unreadable or shorter than one window.
    """
    text = calibration_text() if data in (None, BUILTIN) else read_text(data)
    return TokenWindows(token_windows(tokenizer, text, 1 << 62, seq), seed)
