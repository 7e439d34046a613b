"""Mixed formats: every block of the model gets its own int4 group size, int8 or float, by measured sensitivity.

A byte budget buys the most quality when the bytes go where rounding hurts most. `MixedBits`
scores, on calibration text, how much the model's outputs move when each block (one decoder
layer's attention projections, or its MLP) alone is held in each option the registered strategies
declare (`Strategy.block_options`: int4 in groups of 32, 64 and 128, int8; and float)
(`memfit.strategies.quantize.sensitivity`), then chooses every block's option at once, exactly,
for the least total divergence within the budget (`allocate`: a multiple-choice knapsack).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.memory.report import weight_bytes
from memfit.models.arch import decoder_parts
from memfit.models.meta import meta_copy
from memfit.strategies.base import BlockOption, Phase, Strategy
from memfit.strategies.quantize.calibrated import Method, calibrated_layers_, has_values
from memfit.strategies.quantize.rtn import INT4_GROUP_SIZES, Int8WeightOnly
from memfit.strategies.quantize.walk import quantize_model_
from memfit.strategies.registry import register, strategy_classes
from memfit.strategies.targets import Targets
from memfit.workload import Context

if TYPE_CHECKING:
    from memfit.workload import Workload

FLOAT = 16
"""Legacy width of a unit left in float (recipes that record ``widths``: 4, 8 or 16)."""
WIDTHS = (4, 8, FLOAT)
SENSITIVITY_TOKENS = 512  # calibration tokens the sensitivity runs score
RESOLUTION = 1 << 16  # `allocate`'s byte steps: a 65,536th of the budget above the cheapest choice

FLOAT_OPTION = BlockOption(
    "float", None, lambda linear: linear.weight.numel() * linear.weight.element_size(), lambda linear, hessian: linear
)

_TOKEN = re.compile(r"mixed-bits(?:-(\d+(?:\.\d+)?))?(-rtn)?")


def block_options() -> dict[str, BlockOption]:
    """Every registered strategy's `BlockOption`, by token, and ``float``."""
    options = {option.token: option for cls in strategy_classes() for option in cls.block_options()}
    return {**options, FLOAT_OPTION.token: FLOAT_OPTION}


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


def allocate(costs: list[dict[str, int]], scores: list[dict[str, float]], cap: int) -> list[str]:
    """The option of every unit with the least total score whose total cost fits ``cap``.

    An exact multiple-choice knapsack by dynamic programming over bytes. Each option's cost
    above its unit's cheapest is rounded up to whole steps of ``ceil(slack / RESOLUTION)`` bytes
    (``slack``: the cap above the all-cheapest total), so the choice always fits; it is optimal
    among the choices whose rounded costs fit, which gives up at most one step per unit (under
    0.1% of the slack for 60 units). Ties go to the cheaper option.

    Args:
        costs: per unit, bytes of each option.
        scores: per unit, the score (divergence) of each option; lower is better.
        cap: total bytes the units may hold.

    Returns:
        Per unit, the chosen option's key; every unit's cheapest if even those exceed ``cap``.
    """
    cheapest = [min(c, key=lambda key: (c[key], scores[i][key])) for i, c in enumerate(costs)]
    slack = cap - sum(c[key] for c, key in zip(costs, cheapest, strict=True))
    if slack <= 0 or not costs:
        return cheapest
    step = -(-slack // RESOLUTION)
    size = slack // step + 1
    best = np.zeros(size)  # best[b]: least score of the units so far within b steps
    picks = []
    for i, unit in enumerate(costs):
        keys = sorted(unit, key=lambda key: (unit[key], scores[i][key]))
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=np.int16)
        for j, key in enumerate(keys):
            extra = -(-(unit[key] - unit[cheapest[i]]) // step)
            if extra >= size:
                continue
            total = np.full(size, np.inf)
            total[extra:] = best[: size - extra] + scores[i][key]
            better = total < new
            new[better], pick[better] = total[better], j
        best = new
        picks.append((keys, pick))
    chosen, b = [], size - 1
    for i in reversed(range(len(costs))):
        keys, pick = picks[i]
        key = keys[pick[b]]
        chosen.append(key)
        b -= -(-(costs[i][key] - costs[i][cheapest[i]]) // step)
    return chosen[::-1]


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedBits(Strategy):
    """Per-block formats (int4 in groups of 32, 64 or 128, int8, or float) chosen by measured
    sensitivity to fit a size.

    Args:
        bits: average bits per weight the decoder layers' Linears may hold, scales included
            (from int4's 4.2-4.4; above int8's 8.0, some blocks stay in float). Token
            ``mixed-bits`` is 5 bits; ``mixed-bits-6.5`` sets it. The planner sets it from the budget.
        group_size: the int4 groups of ``widths`` (recipes written before ``choices``).
        method: how the int4 and int8 codes are chosen (GPTQ by default; RTN, token suffix
            ``-rtn``, skips the Hessians).
        choices: the chosen option of each unit (see `units_of`; tokens of `block_options`, such as
            ``"int4-g64"``), filled in when the strategy is applied with calibration text and
            recorded in the saved recipe; empty until then.
        widths: the same as 4, 8 or 16 bits (int4 at ``group_size``, int8, float), as recipes
            written before ``choices`` record them; read into ``choices``.
        targets: which modules to quantize (default: every Linear, the embedding and the head; the
            embedding and head are int8, as in the int4 recipes).
    """

    name = "mixed-bits"
    forms = "mixed-bits[-B][-rtn]"
    summary = (
        "int4 (groups of 32, 64 or 128), int8 or float per attention/MLP block by measured sensitivity, B bits "
        "per weight on average (default 5); GPTQ codes, or round to nearest with -rtn"
    )
    phase = Phase.QUANTIZE
    conflicts = ("int8", "int4", "w8a8", "fp8")
    sqnr_floor_db = 12.0

    bits: float = 5.0
    group_size: int = 128
    method: Method = Method.GPTQ
    choices: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        if not 4 <= self.bits <= 32:
            raise ValueError(f"bits must be between 4 and 32, got {self.bits}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if any(w not in WIDTHS for w in self.widths):
            raise ValueError(f"widths must be among {WIDTHS}, got {sorted(set(self.widths))}")
        choices = tuple(self.choices) or tuple(
            {4: f"int4-g{self.group_size}", 8: "int8", FLOAT: "float"}[w] for w in self.widths
        )
        unknown = sorted(set(choices) - set(block_options()))
        if unknown:
            raise ValueError(f"choices must be among {sorted(block_options())}, got {unknown}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "widths", ())

    @property
    def token(self) -> str:
        bits = "" if self.bits == 5.0 else f"-{self.bits:g}"
        return f"mixed-bits{bits}{'-rtn' if self.method is Method.RTN else ''}"

    @property
    def needs_calibration(self) -> bool:
        return not self.choices or self.method is Method.GPTQ

    @property
    def resolves(self) -> bool:
        return not self.choices

    @classmethod
    def from_token(cls, token: str) -> MixedBits | None:
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        bits = float(match.group(1)) if match.group(1) else 5.0
        if not 4 <= bits <= 32:
            raise RecipeError(f"recipe token {token!r} asks for {bits:g} bits per weight",
                              "use between 4 and 32, as in mixed-bits-6")
        return cls(bits=bits, method=Method.RTN if match.group(2) else Method.GPTQ)

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(bits=6.0, method=Method.RTN)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return []  # the planner sizes it to the budget (`budget_options`)

    @classmethod
    def budget_options(cls, model: nn.Module, budget_bytes: int, workload: Workload) -> list[Strategy]:
        """The mixed plan that fills ``budget_bytes``, if the budget lies between every block in
        its smallest option and every block in float."""
        linears = [m for _, unit in units_of(model, Targets()) for _, m in unit]
        params = sum(m.weight.numel() for m in linears)
        if not params:
            return []
        options = block_options()
        rest = _int8_weight_bytes(model) - sum(options["int8"].nbytes(m) for m in linears)
        bits = math.floor((budget_bytes - rest) * 8 / params * 100) / 100
        sizes = [sum(o.nbytes(m) for m in linears) * 8 / params for o in options.values()]
        return [cls(bits=bits)] if min(sizes) < bits < min(max(sizes), 32) else []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        units = units_of(model, self.targets)
        choices = self.choices
        if not choices:
            choices = self.choose(model, units, ctx)
            ctx.resolve(self, dataclasses.replace(self, choices=choices))
        if len(choices) != len(units):
            raise RecipeError(
                f"{self.token}: the recipe has choices for {len(choices)} units, the model has {len(units)}",
                "apply mixed-bits without choices to this model (they are made on calibration text)",
            )
        options = block_options()
        option_of = {fqn: options[choice] for (_, unit), choice in zip(units, choices, strict=True) for fqn, _ in unit}

        def quantize(fqn: str, linear: nn.Linear, hessian: torch.Tensor | None = None) -> nn.Module:
            return option_of.get(fqn, options["int4-g128"]).make(linear, hessian)

        kept = tuple(fqn for fqn, option in option_of.items() if option is FLOAT_OPTION)
        targets = dataclasses.replace(self.targets, exclude=self.targets.exclude + kept)
        if self.method is Method.GPTQ and (has_values(model) or ctx.source is not None):
            calibrated_layers_(model, ctx, targets, self.token, rtn_quantize=quantize, gptq_quantize=quantize)
        quantize_model_(model, ctx, targets, quantize, self.token)
        counts = {token: choices.count(token) for token in options if choices.count(token)}
        ctx.note(f"{self.token}: blocks at " + ", ".join(f"{token} x {n}" for token, n in counts.items()))
        return model

    def choose(self, model: nn.Module, units, ctx: Context) -> tuple[str, ...]:
        """The option of every unit (`units_of`) within `bits`: measured scores (kept in
        ``ctx.memo``) and the exact allocation; on tensors without values, a guess by bytes."""
        options = block_options()
        costs = [{t: sum(o.nbytes(m) for _, m in unit) for t, o in options.items()} for _, unit in units]
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
            scores = block_scores(model, units, options, ctx, self.token)
        else:
            scores = None
        if scores is None:  # a prediction has no values: assume divergence falls as bytes grow
            scores = [{t: c["float"] / c[t] - 1.0 for t in c} for c in costs]
        return tuple(allocate(costs, scores, cap))


def block_scores(
    model: nn.Module, units, options: dict[str, BlockOption], ctx: Context, label: str
) -> list[dict[str, float]] | None:
    """Per unit, the KL divergence (nats per token, on `SENSITIVITY_TOKENS` calibration tokens)
    of the model's outputs when that unit alone is held in each option (0 for float); None on
    fake tensors. Kept in ``ctx.memo`` by unit and option, so applications that share a Context
    (the planner's candidates, on copies of one model) measure each once."""
    from memfit.strategies.quantize.sensitivity import sensitivity_table

    # a unit is known by its Linears' names and shapes and the unit count: a pruned or
    # layer-dropped copy of the model scores its own units
    names = [tuple((fqn, *m.weight.shape) for fqn, m in unit) for _, unit in units]
    key = lambda index, token: ("block-score", len(units), names[index], token)
    fakes = {t: o for t, o in options.items() if o.fake is not None}
    missing = [t for t in fakes if any(key(i, t) not in ctx.memo for i in range(len(units)))]
    if missing:
        batches = sensitivity_batches(ctx.calibration_for(label))
        progress = lambda done, total: ctx.report(f"{label}: sensitivity", done, total)
        table = sensitivity_table(model, batches, [(i, [m for _, m in u]) for i, u in units],
                                  [fakes[t].fake for t in missing], progress)
        for i, row in enumerate(table):
            ctx.memo.update({key(i, t): kl for t, kl in zip(missing, row, strict=True)})
    if any(ctx.memo[key(i, t)] is None for i in range(len(units)) for t in fakes):
        return None
    return [{t: ctx.memo[key(i, t)] if t in fakes else 0.0 for t in options} for i in range(len(units))]


def _int8_weight_bytes(model: nn.Module) -> int:
    """What ``model`` would hold after ``int8`` (counted on a meta copy, nothing allocated)."""
    copy = meta_copy(model)
    with torch.no_grad():
        Int8WeightOnly().apply(copy, Context())
    return weight_bytes(copy)


def sensitivity_batches(calibration) -> list[torch.Tensor]:
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
