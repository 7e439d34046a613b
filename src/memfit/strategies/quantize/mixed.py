"""Mixed bit-widths: each part of the model gets int4, int8 or stays in float, by measured sensitivity.

A byte budget buys the most quality when the bytes go where rounding hurts most. `MixedBits`
measures, on calibration text, how much the model's outputs move when each unit (one decoder
layer's attention projections, or its MLP) alone is rounded to 4 bits
(`memfit.strategies.quantize.sensitivity`), then spends the budget greedily: starting from all-int4, it
widens the unit with the largest drop in divergence per extra byte, to int8 or to float, until
the next widening would not fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.memory.report import weight_bytes
from memfit.models.arch import decoder_parts
from memfit.models.meta import meta_copy
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.quantize.calibrated import Method, calibrated_layers_, has_values
from memfit.strategies.quantize.grids import fake_quantize_int4, fake_quantize_int8, int4_group_size
from memfit.strategies.quantize.rtn import INT4_GROUP_SIZES, Int8WeightOnly, int4_linear_from, int8_linear_from
from memfit.strategies.quantize.walk import quantize_model_
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets
from memfit.workload import Context

if TYPE_CHECKING:
    from memfit.workload import Workload

FLOAT = 16
"""The width of a unit left in float (in the model's dtype; with ``bf16`` in the recipe, bf16)."""
WIDTHS = (4, 8, FLOAT)
SENSITIVITY_TOKENS = 512  # calibration tokens the sensitivity runs score

_TOKEN = re.compile(r"mixed-bits(?:-(\d+(?:\.\d+)?))?(-rtn)?")


def units_of(model: nn.Module, targets: Targets) -> list[tuple[int, list[tuple[str, nn.Linear]]]]:
    """The units widths are chosen for: per decoder layer, the targeted Linears of each child
    module (``self_attn``, ``mlp``), in model order."""
    parts = decoder_parts(model)
    units = []
    for index, layer in enumerate(parts.layers):
        for child_name, child in layer.named_children():
            prefix = f"{parts.layers_fqn}.{index}.{child_name}"
            named = ((f"{prefix}.{name}" if name else prefix, m) for name, m in child.named_modules())
            linears = [(fqn, m) for fqn, m in named if isinstance(m, nn.Linear) and targets.matches(fqn)]
            if linears:
                units.append((index, linears))
    return units


def linear_bytes(linear: nn.Linear, width: int, group_size: int) -> int:
    """Bytes ``linear``'s weight holds at ``width`` (int4: codes, bf16 scales and uint8 zero
    points per group; int8: codes and a bf16 scale per row; float: as it is)."""
    n, k = linear.out_features, linear.in_features
    if width == 4:
        return n * k // 2 + 3 * n * math.ceil(k / int4_group_size(k, group_size))
    if width == 8:
        return n * k + 2 * n
    return n * k * linear.weight.element_size()


def allocate(costs: list[dict[int, int]], gains: list[dict[int, float]], cap: int) -> list[int]:
    """Greedy widths: start every unit at 4 bits and repeatedly take the widening with the most
    divergence removed per extra byte that still fits under ``cap`` total bytes.

    Args:
        costs: per unit, bytes at each width.
        gains: per unit, divergence removed by each width relative to 4 bits (0 for 4).
        cap: total bytes the units may hold.
    """
    widths = [4] * len(costs)
    used = sum(c[4] for c in costs)
    while True:
        best = None
        for i, width in enumerate(widths):
            for wider in (w for w in WIDTHS if w > width):
                extra = costs[i][wider] - costs[i][width]
                gain = gains[i][wider] - gains[i][width]
                if used + extra <= cap and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, i, wider, extra)
        if best is None:
            return widths
        _, i, wider, extra = best
        widths[i] = wider
        used += extra


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedBits(Strategy):
    """Per-unit bit-widths (int4, int8 or float) chosen by measured sensitivity to fit a size.

    Args:
        bits: average bits per weight the decoder layers' Linears may hold, scales included
            (between int4's 4.2-4.4 and int8's 8.0; above, some units stay in float). Token
            ``mixed-bits`` is 5 bits; ``mixed-bits-6.5`` sets it. The planner sets it from the budget.
        group_size: groups of the int4 units.
        method: how the int4 and int8 codes are chosen (GPTQ by default; RTN, token suffix
            ``-rtn``, skips the Hessians).
        widths: the chosen width of each unit (see `units_of`), filled in when the strategy is
            applied with calibration text, and recorded in the saved recipe; empty until then.
        targets: which modules to quantize (default: every Linear, the embedding and the head; the
            embedding and head are int8, as in the int4 recipes).
    """

    name = "mixed-bits"
    forms = "mixed-bits[-B][-rtn]"
    summary = (
        "int4, int8 or float per attention/MLP block by measured sensitivity, B bits per weight on average "
        "(default 5); GPTQ codes, or round to nearest with -rtn"
    )
    phase = Phase.QUANTIZE
    conflicts = ("int8", "int4", "w8a8", "fp8")
    sqnr_floor_db = 12.0

    bits: float = 5.0
    group_size: int = 128
    method: Method = Method.GPTQ
    widths: tuple[int, ...] = ()
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        if not 4 <= self.bits <= 16:
            raise ValueError(f"bits must be between 4 and 16, got {self.bits}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if any(w not in WIDTHS for w in self.widths):
            raise ValueError(f"widths must be among {WIDTHS}, got {sorted(set(self.widths))}")

    @property
    def token(self) -> str:
        bits = "" if self.bits == 5.0 else f"-{self.bits:g}"
        return f"mixed-bits{bits}{'-rtn' if self.method is Method.RTN else ''}"

    @property
    def needs_calibration(self) -> bool:
        return not self.widths or self.method is Method.GPTQ

    @property
    def resolves(self) -> bool:
        return not self.widths

    @classmethod
    def from_token(cls, token: str) -> MixedBits | None:
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        bits = float(match.group(1)) if match.group(1) else 5.0
        if not 4 <= bits <= 16:
            raise RecipeError(f"recipe token {token!r} asks for {bits:g} bits per weight",
                              "use between 4 and 16, as in mixed-bits-6")
        return cls(bits=bits, method=Method.RTN if match.group(2) else Method.GPTQ)

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(bits=6.0, method=Method.RTN)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return []  # the planner sizes it to the budget (`budget_options`)

    @classmethod
    def budget_options(cls, model: nn.Module, budget_bytes: int, workload: Workload) -> list[Strategy]:
        """The mixed plan that fills ``budget_bytes``, if the budget lies between int4 and int8."""
        units = units_of(model, Targets())
        linears = [m for _, unit in units for _, m in unit]
        params = sum(m.weight.numel() for m in linears)
        if not params:
            return []
        rest = _int8_weight_bytes(model) - sum(linear_bytes(m, 8, 128) for m in linears)
        bits = math.floor((budget_bytes - rest) * 8 / params * 100) / 100
        int4_bits = sum(linear_bytes(m, 4, 128) for m in linears) * 8 / params
        return [cls(bits=bits)] if int4_bits < bits < 8 else []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        units = units_of(model, self.targets)
        widths = self.widths
        if not widths:
            widths = self._choose(model, units, ctx)
            ctx.resolve(self, dataclasses.replace(self, widths=widths))
        if len(widths) != len(units):
            raise RecipeError(
                f"{self.token}: the recipe has widths for {len(widths)} units, the model has {len(units)}",
                "apply mixed-bits without widths to this model (they are chosen on calibration text)",
            )
        width_of = {fqn: width for (_, unit), width in zip(units, widths, strict=True) for fqn, _ in unit}

        def quantize(fqn: str, linear: nn.Linear, hessian: torch.Tensor | None = None) -> nn.Module:
            width = width_of.get(fqn, 4)
            if width == 4:
                return int4_linear_from(linear, self.group_size, hessian)
            return int8_linear_from(linear, hessian) if width == 8 else linear

        targets = dataclasses.replace(
            self.targets, exclude=self.targets.exclude + tuple(f for f, w in width_of.items() if w == FLOAT)
        )
        if self.method is Method.GPTQ and (has_values(model) or ctx.source is not None):
            calibrated_layers_(model, ctx, targets, self.token, rtn_quantize=quantize, gptq_quantize=quantize)
        quantize_model_(model, ctx, targets, quantize, self.token)
        counts = {w: widths.count(w) for w in WIDTHS if widths.count(w)}
        ctx.note(f"{self.token}: units at " + ", ".join(f"{'float' if w == FLOAT else f'int{w}'} x {n}"
                                                        for w, n in counts.items()))
        return model

    def _choose(self, model: nn.Module, units, ctx: Context) -> tuple[int, ...]:
        costs = [{w: sum(linear_bytes(m, w, self.group_size) for _, m in unit) for w in WIDTHS} for _, unit in units]
        params = sum(m.weight.numel() for _, unit in units for _, m in unit)
        cap = int(self.bits * params / 8)
        if has_values(model) or ctx.source is not None:
            if ctx.calibration is None:
                raise RecipeError(
                    f"{self.token} needs calibration text to measure each layer's sensitivity",
                    "memfit compress and optimize supply it; in Python pass memfit.Context(calibration=...)",
                )
            if ctx.source is not None:  # every layer is scored in place: read the whole checkpoint
                ctx.source.materialize(model)
                ctx.note(f"{self.token}: the sensitivity runs read the whole checkpoint (not streamed)")
            gains = self._measure(model, units, ctx)
        else:
            gains = None
        if gains is None:  # a prediction has no values: assume divergence proportional to size
            gains = [{4: 0.0, 8: c[4] * 0.9, FLOAT: float(c[4])} for c in costs]
        return tuple(allocate(costs, gains, cap))

    def _measure(self, model: nn.Module, units, ctx: Context) -> list[dict[int, float]] | None:
        """Each unit's divergence removed by int8 and by float; None on fake tensors."""
        from memfit.strategies.quantize.sensitivity import unit_sensitivities

        batches = _sensitivity_batches(ctx.calibration)
        progress = lambda done, total: ctx.report(f"{self.token}: sensitivity", done, total)
        int4 = unit_sensitivities(model, batches, [(i, [m for _, m in u]) for i, u in units],
                                  lambda w: fake_quantize_int4(w, self.group_size), progress)
        # int8's divergence is measured once for all units together and shared in proportion
        everything = [(0, [m for _, unit in units for _, m in unit])]
        int8_total = unit_sensitivities(model, batches, everything, fake_quantize_int8)[0]
        if int8_total is None:
            return None
        share = sum(int4) or 1.0
        return [{4: 0.0, 8: kl - int8_total * kl / share, FLOAT: kl} for kl in int4]


def _int8_weight_bytes(model: nn.Module) -> int:
    """What ``model`` would hold after ``int8`` (counted on a meta copy, nothing allocated)."""
    copy = meta_copy(model)
    with torch.no_grad():
        Int8WeightOnly().apply(copy, Context())
    return weight_bytes(copy)


def _sensitivity_batches(calibration) -> list[torch.Tensor]:
    """The first `SENSITIVITY_TOKENS` calibration tokens, as batches [1, T]."""
    batches, left = [], SENSITIVITY_TOKENS
    for window in calibration:
        window = window if window.dim() == 2 else window[None]
        take = window[:, : max(1, left // window.shape[0])]
        batches.append(take)
        left -= take.numel()
        if left <= 0:
            break
    return batches
