"""`compress`: apply a recipe to a model, measure the result and save it, in one streamed run; and
the memory that run's calibration is predicted to need.

The prediction is the calibration itself, run on fake tensors under the tracker, as `estimate`
runs workloads (principle 1 of docs/architecture.md): a copy of the model with shapes and no data
(a streamed checkpoint read as `CheckpointSource.fake` reads it: the same tensors, allocated
empty), calibration windows of the same shape, and the same `apply`. Every tensor the real run
allocates and frees, the fake run allocates and frees, so the predicted peak is the tracked peak
of the real run; where the code branches on a value (AWQ's search, GPTQ's column order, which
layers drop-layers removes) the fake run takes the branch a healthy run takes
(`memfit.memory.fake.value_or`). `memfit compress` prints the prediction before it starts and
``--max-memory`` refuses a run that would not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.data import CALIBRATION_WINDOW, CALIBRATION_WINDOWS, calibration_windows
from memfit.errors import BudgetError
from memfit.evaluate import DEFAULT_TOKENS, Metrics, evaluate
from memfit.export import check_target, export
from memfit.io import check_output_dir, load, save
from memfit.memory.tracker import Tracker, track
from memfit.models.load import load_lazy
from memfit.models.meta import meta_copy, to_fake
from memfit.models.stream import CheckpointSource
from memfit.plan import Plan, apply
from memfit.profile import synthetic_input_facts
from memfit.units import format_bytes
from memfit.workload import Context, ProgressFn


@dataclasses.dataclass(frozen=True)
class CalibrationMemory:
    """A calibration run's peak (bytes), where in the run it falls, and what was live at it by
    category (`memfit.memory.CATEGORIES`: the loaded model's weights are ``parameters``; weights
    read from a streamed checkpoint are allocated outside any module and count as ``temporary``)."""

    peak_bytes: int
    phase: str
    parts: dict[str, int]


@dataclasses.dataclass(frozen=True)
class CompressResult:
    """What `compress` did.

    Attributes:
        plan: the plan applied (as parsed; the saved recipe also records resolved choices).
        out: where the model was written.
        metrics: the compressed model's measured metrics.
        notes: what the strategies reported doing beyond their settings.
        predicted_calibration: the calibration run's predicted peak (None without calibration).
        calibration_peak_bytes: the tracked peak of applying the recipe (with calibration, the
            run that was predicted; None without calibration).
    """

    plan: Plan
    out: Path
    metrics: Metrics
    notes: list[str]
    predicted_calibration: CalibrationMemory | None
    calibration_peak_bytes: int | None = None


def compress(
    model: str | Path,
    recipe: Plan | str,
    out: str | Path,
    *,
    fmt: str = "memfit",
    text: str | None = None,
    num_tokens: int = DEFAULT_TOKENS,
    calibration_text: str | None = None,
    num_calibration_windows: int = CALIBRATION_WINDOWS,
    max_memory: int | None = None,
    progress: ProgressFn | None = None,
    on_prediction: Callable[[CalibrationMemory, int, int, bool], None] | None = None,
) -> CompressResult:
    """Load ``model``, apply ``recipe``, evaluate the result and write it to ``out``.

    A calibrated first strategy on a safetensors directory (or ``demo``) streams: the model is
    built with empty weights and each decoder layer is read from the memory-mapped checkpoint just
    before it is calibrated and packed right after, so the float model is never whole. The
    calibration run's peak is predicted before anything is calibrated.

    Args:
        model: a model reference (`memfit.load`).
        recipe: a `Plan` or recipe string.
        out: the output directory (a ``.gguf`` file for the gguf formats); written atomically.
        fmt: ``"memfit"`` or one of `memfit.export.FORMATS`.
        text: evaluation text (default: the built-in evaluation half).
        num_tokens: evaluation tokens.
        calibration_text: calibration text (default: the built-in calibration half).
        num_calibration_windows: calibration windows of `memfit.data.CALIBRATION_WINDOW` tokens.
        max_memory: refuse (`BudgetError`) a calibration run predicted above this many bytes.
        progress: progress callback.
        on_prediction: called with ``(prediction, windows, window, streamed)`` before calibrating.

    Raises:
        RecipeError, OutputError, ModelNotFoundError: bad input, before anything is loaded or
            written where it can be checked first.
        BudgetError: the calibration run is predicted above ``max_memory``.

    Example:
        >>> memfit.compress("demo", "int4-g128-gptq", "smollm2-w4").metrics.perplexity
    """
    plan = Plan.parse(recipe) if isinstance(recipe, str) else recipe.validate()
    out = Path(out)
    if fmt == "memfit":
        check_output_dir(out)
    else:
        check_target(fmt, out, plan)
    # a calibrated first strategy reads the checkpoint layer by layer: the float model is never whole
    lazy = load_lazy(model) if plan.strategies and plan.strategies[0].needs_calibration else None
    loaded, tokenizer, source = lazy if lazy is not None else (*load(model), None)
    calibration, predicted = None, None
    if plan.needs_calibration:
        calibration = calibration_windows(tokenizer, calibration_text, num_calibration_windows, CALIBRATION_WINDOW)
        predicted = predict_calibration_memory(loaded, plan, calibration, source=source, progress=progress)
        if max_memory is not None and predicted.peak_bytes > max_memory:
            raise BudgetError(
                f"calibrating {plan.recipe!r} is predicted to need {format_bytes(predicted.peak_bytes)} "
                f"(in {predicted.phase}), more than --max-memory {format_bytes(max_memory)}",
                "raise --max-memory, use fewer --calibration-windows, or choose a recipe without calibration",
            )
        if on_prediction is not None:
            on_prediction(predicted, len(calibration), calibration[0].shape[-1], source is not None)
    ctx = Context(progress=progress, calibration=calibration, source=source)
    with track(None if source is not None else loaded) as tracker:
        apply(loaded, plan, ctx)
        if source is not None:
            source.materialize(loaded)  # whatever no strategy reached
    metrics = evaluate(loaded, tokenizer, text=text, num_tokens=num_tokens, progress=progress)
    if fmt == "memfit":
        save(loaded, tokenizer, out, notes=ctx.notes)
    else:
        export(loaded, tokenizer, fmt, out)
    peak = tracker.peak_bytes if calibration is not None else None
    return CompressResult(plan, out, metrics, list(ctx.notes), predicted, peak)


def predict_calibration_memory(
    model: nn.Module,
    plan: Plan,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    *,
    source: CheckpointSource | None = None,
    progress: ProgressFn | None = None,
) -> CalibrationMemory:
    """The peak bytes of applying ``plan`` to ``model`` on ``calibration``, predicted by running
    it on fake tensors under the tracker; nothing is allocated and ``model`` is not changed.

    The prediction is the tracked peak of ``apply(model, plan, Context(calibration=..., source=source))``
    followed by ``source.materialize(model)``, tracked as `compress` tracks it (the model's
    tensors count from the start, unless they are read from ``source`` as the run goes).

    Args:
        model: the model (real or meta tensors; a lazily loaded one with ``source``).
        calibration: the calibration windows [N, T] (or batches); only their shapes are used.
        source: the checkpoint a streamed run reads layer by layer (`memfit.models.load.load_lazy`).
        progress: progress callback (the fake run goes through the same steps as the real one).
    """
    plan = plan.validate()
    fake_model = meta_copy(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # module-level constants (bit tables) stay real
    if source is None:
        to_fake(fake_model, mode, torch.device("cpu"))
    steps: list[tuple[int, str]] = []  # (tracker position, what was reported done) as the run goes
    tracker: Tracker | None = None

    def report(description: str, completed: int, total: int) -> None:
        if tracker is not None:
            steps.append((tracker.events, f"{description}, step {completed} of {total}"))
        if progress is not None:
            progress(f"predicting memory: {description}", completed, total)

    with mode, synthetic_input_facts():
        shapes = calibration if isinstance(calibration, torch.Tensor) else list(calibration)
        fake_calibration = (torch.zeros(shapes.shape, dtype=shapes.dtype) if isinstance(shapes, torch.Tensor)
                            else [torch.zeros(b.shape, dtype=b.dtype) for b in shapes])
        fake_source = None if source is None else source.fake()
        with track(None if source is not None else fake_model) as tracker:
            apply(fake_model, plan, Context(progress=report, calibration=fake_calibration, source=fake_source))
            if fake_source is not None:
                fake_source.materialize(fake_model)
    at_peak = tracker.report()
    # the peak falls inside the first step reported done after it
    phase = next((step for position, step in steps if position > tracker.peak_event), "the end of the run")
    parts = {category: n for category, n in at_peak.by_category.items() if n}
    return CalibrationMemory(at_peak.peak_bytes, phase, parts)
