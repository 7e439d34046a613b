"""`compress`: apply a recipe to a model, measure the result and save it, in one streamed run; and
the memory that run's calibration is predicted to need.

Calibration goes decoder layer by decoder layer (`memfit.strategies.layerwise`). While layer i is
processed the run holds:

- the packed embedding and head (packed as soon as the first layer's inputs are captured), the
  layers before i packed, layer i in float, and, unless the checkpoint is streamed, the float
  layers after i;
- each batch's rotary tables, and the larger of two moments: fitting the layer (its inputs, one
  X^T X sum per distinct Linear input, and GPTQ's or AWQ's working set for the largest Linear or
  group) and running it (its inputs and the outputs being produced, with one batch's forward
  temporaries).

Before the layers, the first layer's inputs are captured and the embedding and head are rounded
to int8 while their float weights are still held; mixed bit-widths first score sensitivities on
the whole float model. The predicted peak is the largest of these phases; `memfit compress`
prints it and ``--max-memory`` refuses a run that would not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from memfit.data import CALIBRATION_WINDOW, CALIBRATION_WINDOWS, calibration_windows
from memfit.errors import BudgetError
from memfit.evaluate import DEFAULT_TOKENS, Metrics, evaluate
from memfit.export import check_target, export
from memfit.io import check_output_dir, load, save
from memfit.memory.report import weight_bytes
from memfit.models.arch import decoder_parts
from memfit.models.load import load_lazy
from memfit.models.meta import meta_copy
from memfit.plan import Plan, apply
from memfit.strategies.prune.sparse import PruneMethod
from memfit.strategies.quantize.awq import MAX_TOKENS as AWQ_ROWS
from memfit.strategies.quantize.awq import scale_groups
from memfit.strategies.quantize.calibrated import Method
from memfit.strategies.quantize.grids import CHUNK_VALUES
from memfit.strategies.quantize.mixed import SENSITIVITY_TOKENS, MixedBits
from memfit.strategies.quantize.sensitivity import CHUNK_ROWS
from memfit.units import format_bytes
from memfit.workload import Context, ProgressFn

# fp32 K x K matrices GPTQ (and SparseGPT, the same loop) holds for a Linear with K inputs at its
# peak: the Hessian handed over, its working copy, and the Cholesky factor and inverse (see
# memfit.strategies.quantize.gptq)
GPTQ_SQUARES = 4
# fp32 N x K matrices it holds: the float weight, its permuted copy and the codes
GPTQ_WEIGHTS = 3
# vocabulary-wide fp32 tensors per chunk of rows while a sensitivity run scores it (logits,
# log-probabilities, KL terms)
SENSITIVITY_CHUNKS = 4
# float temporaries of a chunk being rounded to int8 (the scaled, rounded and clamped values)
PACK_TEMPORARIES = 3


@dataclasses.dataclass(frozen=True)
class CalibrationMemory:
    """A predicted calibration peak and what makes it up (bytes)."""

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
    """

    plan: Plan
    out: Path
    metrics: Metrics
    notes: list[str]
    predicted_calibration: CalibrationMemory | None


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
        windows, window = len(calibration), calibration[0].shape[-1]
        predicted = predict_calibration_memory(loaded, plan, windows, window, streamed=source is not None)
        if max_memory is not None and predicted.peak_bytes > max_memory:
            raise BudgetError(
                f"calibrating {plan.recipe!r} is predicted to need {format_bytes(predicted.peak_bytes)} "
                f"(at {predicted.phase}), more than --max-memory {format_bytes(max_memory)}",
                "raise --max-memory, use fewer --calibration-windows, or choose a recipe without calibration",
            )
        if on_prediction is not None:
            on_prediction(predicted, windows, window, source is not None)
    ctx = Context(progress=progress, calibration=calibration, source=source)
    apply(loaded, plan, ctx)
    if source is not None:
        source.materialize(loaded)  # whatever no strategy reached
    metrics = evaluate(loaded, tokenizer, text=text, num_tokens=num_tokens, progress=progress)
    if fmt == "memfit":
        save(loaded, tokenizer, out, notes=ctx.notes)
    else:
        export(loaded, tokenizer, fmt, out)
    return CompressResult(plan, out, metrics, list(ctx.notes), predicted)


def predict_calibration_memory(
    model: nn.Module, plan: Plan, windows: int, window: int, *, streamed: bool
) -> CalibrationMemory:
    """Predict the peak bytes of applying ``plan`` with ``windows`` calibration windows of
    ``window`` tokens to ``model`` (real or meta tensors; it is not changed).

    The strategies run one after another over the whole model (`memfit.plan.apply`), so the run
    is predicted strategy by strategy: a calibrated one goes layer by layer from the model the
    strategies before it left (only the first reads a streamed checkpoint as it goes), any other
    rewrites the loaded model in one walk.

    Args:
        streamed: the model's weights are read from its checkpoint layer by layer
            (`memfit.models.load.load_lazy`), so float layers are held one at a time.
    """
    current = meta_copy(model)
    if getattr(model.config, "tie_word_embeddings", False):  # a lazy model ties only as it is read
        current.tie_weights()
    shape = _RunShape.of(current, windows, window)
    phases: list[tuple[str, dict[str, int]]] = []
    for index, strategy in enumerate(plan.validate().strategies):
        after = meta_copy(current)
        with torch.no_grad():
            apply(after, Plan((strategy,), plan.workload), Context())
        first_read = streamed and index == 0
        if strategy.needs_calibration:
            phases += _layer_phases(current, after, strategy, shape, streamed=first_read)
        else:  # one walk over the loaded model: the larger of before and after, and one layer's temporaries
            phases.append((strategy.token, {
                "weights": max(weight_bytes(current), weight_bytes(after)),
                "working set": min(CHUNK_VALUES, _largest(current)) * 4 * PACK_TEMPORARIES,
            }))
        current = after
    phases.append(("end", {"weights": weight_bytes(current)}))
    phase, parts = max(phases, key=lambda item: sum(item[1].values()))
    return CalibrationMemory(sum(parts.values()), phase, parts)


@dataclasses.dataclass(frozen=True)
class _RunShape:
    """The calibration run's activation sizes, in bytes."""

    tokens: int
    hidden: int  # every window's hidden states for one layer
    rotary: int  # each batch's rotary tables
    forward: int  # one batch through a layer
    logits_row: int  # one token's fp32 logits
    act: int  # bytes per activation value

    @classmethod
    def of(cls, model: nn.Module, windows: int, window: int) -> _RunShape:
        config = model.config
        act = _activation_size(model)
        tokens = windows * window
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        forward = window * (3 * getattr(config, "intermediate_size", 4 * config.hidden_size)
                            + 4 * config.hidden_size) * act
        return cls(tokens, tokens * config.hidden_size * act, windows * 2 * window * head_dim * act, forward,
                   config.vocab_size * 4, act)


def _layer_phases(
    before: nn.Module, after: nn.Module, strategy, shape: _RunShape, *, streamed: bool
) -> list[tuple[str, dict[str, int]]]:
    """The phases of one calibrated strategy going layer by layer from ``before`` to ``after``."""
    parts_b, parts_a = decoder_parts(before), decoder_parts(after)
    layers_b = [weight_bytes(layer) for layer in parts_b.layers]
    # layers dropped at the end of a pass (drop-layers) are all held through it, as they were
    layers_a = [weight_bytes(layer) for layer in parts_a.layers] if len(parts_a.layers) == len(layers_b) else layers_b
    outside_b = weight_bytes(before) - sum(layers_b)
    outside_a = weight_bytes(after) - sum(weight_bytes(layer) for layer in parts_a.layers)
    phases = []
    if outside_a != outside_b:
        # quantization packs the embedding and head once the first layer's inputs are captured,
        # while their float weights are still held
        resident = outside_b + (0 if streamed else sum(layers_b))
        packing = min(CHUNK_VALUES, _largest(before)) * 4 * PACK_TEMPORARIES
        phases.append(("packing the embedding", {
            "weights": resident + outside_a, "hidden states": shape.hidden, "rotary tables": shape.rotary,
            "working set": packing,
        }))
    # a streamed run that leaves the head alone reads it only at the end (tied: with the embedding)
    head = before.get_output_embeddings()
    embedding = before.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    unread = weight_bytes(head) if streamed and outside_a == outside_b and head is not None and not tied else 0
    method = getattr(strategy, "method", None)
    second_order = method in (Method.GPTQ, PruneMethod.SPARSEGPT) or getattr(strategy, "activation_aware", False)
    awq = getattr(strategy, "awq", False)
    for index, layer in enumerate(parts_b.layers):
        weights = outside_a - unread + sum(layers_a[:index]) + layers_b[index]
        if not streamed:
            weights += sum(layers_b[index + 1 :])
        hessians, work = (_gptq_bytes(layer) if second_order else (0, 0))
        if awq:
            work = max(work, _awq_bytes(layer, min(shape.tokens, AWQ_ROWS)))
        # the layer is fitted on its inputs (sums, searches), then run to produce the next inputs
        fitting = {"hidden states": shape.hidden, "hessians": hessians, "working set": max(work, shape.forward)}
        running = {"hidden states": 2 * shape.hidden, "working set": shape.forward}
        moment = max(fitting, running, key=lambda part: sum(part.values()))
        label = f"{strategy.token}: layer {index}"
        phases.append((label, {"weights": weights, "rotary tables": shape.rotary, **moment}))
    if isinstance(strategy, MixedBits) and not strategy.widths:
        # sensitivity runs: the whole float model, every layer's inputs, the reference
        # log-probabilities and a chunk's logits, log-probabilities and KL terms
        scored = min(shape.tokens, SENSITIVITY_TOKENS)
        chunk = min(scored, CHUNK_ROWS) * shape.logits_row
        hidden_size = shape.hidden // (shape.tokens * shape.act)
        phases.append(("sensitivity", {
            "weights": weight_bytes(before),
            "hidden states": (len(layers_b) + 2) * scored * hidden_size * shape.act,
            "log-probs": scored * shape.logits_row + SENSITIVITY_CHUNKS * chunk,
            "working set": max(layers_b, default=0),  # one layer's rounded weights
        }))
    return phases


def _largest(model: nn.Module) -> int:
    return max((p.numel() for p in model.parameters()), default=0)


def _activation_size(model: nn.Module) -> int:
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return floats[0].element_size() if floats else 4


def _awq_bytes(layer: nn.Module, rows: int) -> int:
    """AWQ's search: every group's captured inputs (fp32), then for one group the reference and
    trial outputs [rows, sum N] and the scaled and rounded weight copies."""
    groups = scale_groups(layer)
    captured = sum(4 * rows * g.linears[0].in_features for g in groups)
    search = max((4 * (3 * rows + 4 * g.linears[0].in_features) * sum(m.out_features for m in g.linears)
                  for g in groups), default=0)
    return captured + search


def _gptq_bytes(layer: nn.Module) -> tuple[int, int]:
    """(X^T X sums held for the layer, GPTQ's working set for its largest Linear), in bytes."""
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    shared = {id(m) for g in scale_groups(layer) for m in g.linears[1:] if len(g.linears) > 1}
    hessians = sum(4 * m.in_features**2 for m in linears if id(m) not in shared)
    work = max(4 * (GPTQ_SQUARES * m.in_features**2 + GPTQ_WEIGHTS * m.in_features * m.out_features)
               for m in linears) if linears else 0
    return hessians, work
