"""W8A8: int8 weights and int8 activations, multiplied in integer arithmetic; and float8 weights.

`W8A8` rounds weights to int8 per output channel (as `Int8WeightOnly` does) and, when a layer
runs on many tokens (prefill, scoring, batches), rounds its input to int8 per token on the fly
and multiplies with ``torch._int_mm`` (int32 accumulation). SmoothQuant-style smoothing
(``w8a8-smooth``) first moves activation outliers into the weights, from calibration text.

`Fp8Weights` stores weights as float8 (e4m3) per output channel.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.quantize.calibrated import calibrated_layers_, has_values
from memfit.strategies.quantize.grids import quantize_fp8_rows
from memfit.strategies.quantize.packed import Fp8Linear, Int8DynamicLinear
from memfit.strategies.quantize.smooth import smooth_layer
from memfit.strategies.quantize.walk import packed_rows, quantize_model_
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets

if TYPE_CHECKING:
    from memfit.workload import Context, Workload


_W8A8_TOKEN = re.compile(r"w8a8(-smooth(\d*\.?\d+)?)?")
DEFAULT_SMOOTHING = 0.5


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8(Strategy):
    """int8 weights per output channel and int8 activations per token, integer matmuls.

    Memory: as `Int8WeightOnly` (N x K bytes plus N bf16 scales per Linear; embedding and head int8
    per row), so about 26% of fp32. Speed: inputs of more than 64 tokens multiply in int8 with
    int32 accumulation (VNNI on x86), faster than an fp32 matmul; shorter inputs (decode) take the
    weight-only int8 kernel, which reads the same bytes and rounds only the weight. Quality:
    rounding activations costs more than rounding weights; ``smoothing`` (SmoothQuant) recovers
    much of it from calibration text.

    Args:
        smoothing: SmoothQuant's migration strength alpha in (0, 1], or None for no smoothing.
            Token ``w8a8-smooth`` is alpha 0.5; ``w8a8-smooth0.7`` sets it.
        targets: which modules to quantize (default: every Linear, the embedding and the head).
    """

    name = "w8a8"
    forms = "w8a8[-smooth[A]]"
    summary = (
        "int8 weights and per-token int8 activations for long inputs; -smooth SmoothQuant smoothing with "
        "alpha A (default 0.5)"
    )
    phase = Phase.QUANTIZE
    conflicts = ("int8", "int4")
    sqnr_floor_db = 25.0

    smoothing: float | None = None
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        if self.smoothing is not None and not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")

    @property
    def token(self) -> str:
        if self.smoothing is None:
            return "w8a8"
        return "w8a8-smooth" if self.smoothing == DEFAULT_SMOOTHING else f"w8a8-smooth{self.smoothing:g}"

    @property
    def needs_calibration(self) -> bool:
        return self.smoothing is not None

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # same bytes as int8 and more perplexity (+2.5% against +0.35% on the demo); it wins on
        # prefill speed, which the planner does not weigh yet
        return []

    @classmethod
    def from_token(cls, token: str) -> W8A8 | None:
        match = _W8A8_TOKEN.fullmatch(token)
        if match is None:
            return None
        if match.group(1) is None:
            return cls()
        smoothing = float(match.group(2)) if match.group(2) else DEFAULT_SMOOTHING
        if not 0 < smoothing <= 1:
            raise RecipeError(f"recipe token {token!r} asks for smoothing {smoothing:g}",
                              "use an alpha in (0, 1], as in w8a8-smooth0.6, or w8a8-smooth for 0.5")
        return cls(smoothing=smoothing)

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(smoothing=DEFAULT_SMOOTHING)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        quantize = lambda fqn, linear: packed_rows(linear, Int8DynamicLinear)
        if self.smoothing is not None and (has_values(model) or ctx.source is not None):
            smooth = lambda layer, inputs, groups: smooth_layer(layer, inputs, self.smoothing, groups)
            calibrated_layers_(model, ctx, self.targets, self.token, rtn_quantize=quantize, scale_layer=smooth,
                               head_class=Int8DynamicLinear)
        return quantize_model_(model, ctx, self.targets, quantize, self.token, head_class=Int8DynamicLinear)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Weights(Strategy):
    """Weights stored as float8 (e4m3), one bf16 scale per output channel.

    Memory: as int8 (N x K bytes plus N bf16 scales per Linear; the embedding and head stay int8
    per row). Quality: float8's relative step suits weights with a few large values better than
    int8's uniform one, at the same bytes. Speed: this CPU has no float8 arithmetic, so each matmul
    widens the weight to the activation dtype first (slower than int8's packed kernel); GPUs with
    float8 units (H100) are where the format also computes.

    Args:
        targets: which modules to quantize (default: every Linear, the embedding and the head).
    """

    name = "fp8"
    forms = "fp8"
    summary = "float8 (e4m3) weights per output channel"
    phase = Phase.QUANTIZE
    conflicts = ("int8", "int4", "w8a8")
    sqnr_floor_db = 25.0

    targets: Targets = Targets()

    @property
    def token(self) -> str:
        return "fp8"

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return []  # same bytes as int8, slower on CPUs: the planner prefers int8

    @classmethod
    def from_token(cls, token: str) -> Fp8Weights | None:
        return cls() if token == "fp8" else None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls()]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        quantize = lambda fqn, linear: packed_rows(linear, Fp8Linear, quantize_fp8_rows)
        return quantize_model_(model, ctx, self.targets, quantize, self.token)
