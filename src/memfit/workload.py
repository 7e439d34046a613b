"""What to run and what applying a plan may use: `Mode`, `Workload`, `Context`.

A leaf: it imports nothing of memfit but `memfit.errors`, so every package (strategies, the
estimator, the runtime, training) can name a workload without importing the plan above it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from memfit.errors import RecipeError

if TYPE_CHECKING:
    from memfit.models.stream import CheckpointSource


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


ProgressFn = Callable[[str, int, int], None]
"""``progress(description, completed, total)``: called as long work advances."""


@dataclasses.dataclass
class Context:
    """What a strategy may use while it applies: calibration data, device, progress, notes.

    Args:
        calibration: token batches (``LongTensor [B, T]``) for calibrated methods.
        source: a `memfit.models.stream.CheckpointSource` when the model's weights are still
            on the meta device and are read layer by layer as calibration reaches them.
        device: where new tensors go.
        progress: progress callback; the CLI draws a bar on stderr.
        notes: what strategies report doing beyond their settings (for example a group size
            shrunk to fit a layer); shown to the user and saved with the model.
        memo: measurements that applications to copies of one model with the same calibration
            share (mixed-bits' per-block scores): the planner passes one to every candidate.
    """

    calibration: Sequence[Any] | None = None
    source: CheckpointSource | None = None
    device: str = "cpu"
    progress: ProgressFn | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    resolved: dict[Any, Any] = dataclasses.field(default_factory=dict)
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict)

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
                "memfit.Context(calibration=memfit.data.calibration_windows(tokenizer))",
            )
        return self.calibration

    def report(self, description: str, completed: int, total: int) -> None:
        if self.progress is not None:
            self.progress(description, completed, total)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
