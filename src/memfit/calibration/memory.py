"""The memory a calibrated quantization run will need, predicted before it starts.

Calibration goes decoder layer by decoder layer (`memfit.calibration.layerwise`). While layer i is
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

import torch
from torch import nn

from memfit.calibration.awq import MAX_TOKENS as AWQ_ROWS
from memfit.calibration.awq import scale_groups
from memfit.calibration.sensitivity import CHUNK_ROWS
from memfit.memory.estimate import meta_copy
from memfit.memory.report import weight_bytes
from memfit.models.arch import decoder_parts
from memfit.plan import Context, Plan, apply
from memfit.strategies.prune.sparse import PruneMethod
from memfit.strategies.quantize.calibrated import Method
from memfit.strategies.quantize.grids import CHUNK_VALUES
from memfit.strategies.quantize.mixed import SENSITIVITY_TOKENS, MixedBits

# fp32 K x K matrices GPTQ (and SparseGPT, the same loop) holds for a Linear with K inputs at its
# peak: the Hessian handed over, its working copy, and the Cholesky factor and inverse (see
# memfit.calibration.gptq)
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


def predict_calibration_memory(
    model: nn.Module, plan: Plan, windows: int, window: int, *, streamed: bool
) -> CalibrationMemory:
    """Predict the peak bytes of applying ``plan`` with ``windows`` calibration windows of
    ``window`` tokens to ``model`` (real or meta tensors; it is not changed).

    Args:
        streamed: the model's weights are read from its checkpoint layer by layer
            (`memfit.models.load.load_lazy`), so float layers are held one at a time.
    """
    float_model = meta_copy(model)
    if getattr(model.config, "tie_word_embeddings", False):  # a lazy model ties only as it is read
        float_model.tie_weights()
    packed = meta_copy(float_model)
    with torch.no_grad():
        apply(packed, plan, Context())
    parts_f, parts_p = decoder_parts(float_model), decoder_parts(packed)
    float_layers = [weight_bytes(layer) for layer in parts_f.layers]
    packed_layers = [weight_bytes(layer) for layer in parts_p.layers]
    float_outside = weight_bytes(float_model) - sum(float_layers)
    packed_outside = weight_bytes(packed) - sum(packed_layers)

    config = model.config
    act = _activation_size(float_model)
    tokens = windows * window
    hidden = tokens * config.hidden_size * act
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = windows * 2 * window * head_dim * act
    phases = []

    forward = window * (3 * getattr(config, "intermediate_size", 4 * config.hidden_size)
                        + 4 * config.hidden_size) * act  # one batch through a layer

    # capture, then packing the embedding and head while their float weights are still held
    resident = float_outside + (0 if streamed else sum(float_layers))
    packing = min(CHUNK_VALUES, _largest(float_model)) * 4 * PACK_TEMPORARIES
    phases.append(("packing the embedding", {
        "weights": resident + packed_outside, "hidden states": hidden, "rotary tables": rotary,
        "working set": packing,
    }))

    gptq = any(getattr(s, "method", None) in (Method.GPTQ, PruneMethod.SPARSEGPT) for s in plan.strategies)
    awq = any(getattr(s, "awq", False) for s in plan.strategies)
    for index, layer in enumerate(parts_f.layers):
        weights = packed_outside + sum(packed_layers[:index]) + float_layers[index]
        if not streamed:
            weights += sum(float_layers[index + 1 :])
        hessians, work = (_gptq_bytes(layer) if gptq else (0, 0))
        if awq:
            work = max(work, _awq_bytes(layer, min(tokens, AWQ_ROWS)))
        # the layer is fitted on its inputs (sums, searches), then run to produce the next inputs
        fitting = {"hidden states": hidden, "hessians": hessians, "working set": max(work, forward)}
        running = {"hidden states": 2 * hidden, "working set": forward}
        moment = max(fitting, running, key=lambda part: sum(part.values()))
        phases.append((f"layer {index}", {"weights": weights, "rotary tables": rotary, **moment}))
    if any(isinstance(s, MixedBits) and not s.widths for s in plan.strategies):
        # sensitivity runs: the whole float model, every layer's inputs, the reference
        # log-probabilities and a chunk's logits, log-probabilities and KL terms
        scored = min(tokens, SENSITIVITY_TOKENS)
        chunk = min(scored, CHUNK_ROWS) * config.vocab_size * 4
        phases.append(("sensitivity", {
            "weights": weight_bytes(float_model),
            "hidden states": (len(float_layers) + 2) * scored * config.hidden_size * act,
            "log-probs": scored * config.vocab_size * 4 + SENSITIVITY_CHUNKS * chunk,
            "working set": max(float_layers, default=0),  # one layer's rounded weights
        }))
    phases.append(("end", {"weights": weight_bytes(packed)}))
    phase, parts = max(phases, key=lambda item: sum(item[1].values()))
    return CalibrationMemory(sum(parts.values()), phase, parts)


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
