"""`Prune`: unstructured and N:M sparsity of the decoder layers' Linears, held as `SparseLinear`.

Three ways to choose what goes: magnitude (|W|, no data), Wanda (|W| times the input's norm, one
calibration pass) and SparseGPT (second order, with updates of the kept weights). The calibrated
methods run decoder layer by decoder layer on the outputs of the already pruned layers before it,
so a run holds the model plus one layer's calibration activations and statistics; with a
streamed checkpoint (`Context.source`), one float layer at a time.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.models.arch import decoder_parts
from memfit.strategies.base import Phase, Recovery, Strategy, register_field_type
from memfit.strategies.layerwise import InputStatistics, calibrate_layers, observe_inputs, run_layer
from memfit.strategies.prune.masks import keep_mask, kept_per_row, magnitude_scores, wanda_scores
from memfit.strategies.prune.packed import SparseLinear
from memfit.strategies.prune.sparsegpt import sparsegpt_prune
from memfit.strategies.quantize.calibrated import has_values
from memfit.strategies.quantize.walk import set_submodule
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets

if TYPE_CHECKING:
    from memfit.strategies.layerwise import LayerInputs
    from memfit.workload import Context, Workload


@register_field_type
class PruneMethod(enum.Enum):
    """How the weights to prune are chosen."""

    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


_TOKEN = re.compile(r"prune-(?:(\d+)|(\d+)of(\d+))-(magnitude|wanda|sparsegpt)")
GROUPS = (2, 4, 8, 16)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune(Strategy):
    """Remove a share of every decoder Linear's weights and keep only the rest, plus a bitmask.

    Memory: at 50% a Linear holds half its values and one bit per weight (53% of its fp32 bytes);
    with ``int8`` after it, 16%; ``2of4`` holds the same bytes as 50% (the mask is the layout).
    The embedding and output head are not pruned. Quality on SmolLM2-135M at 50%: magnitude
    multiplies perplexity by hundreds, Wanda and SparseGPT by under 2 (docs/benchmarks.md).
    Speed: the forward rebuilds each layer's dense weight, so it is slower than the dense model
    on the CPU; the saving is memory.

    Args:
        sparsity: percent of each row's weights removed (of each group's, with ``group``).
        group: M of N:M sparsity (``prune-2of4-wanda``: 2 kept of every 4 inputs); 0 for
            unstructured.
        method: ``MAGNITUDE`` (no data), ``WANDA`` or ``SPARSEGPT`` (calibration text).
        targets: which decoder Linears to prune (default: all).

    Example:
        >>> memfit.apply(model, "prune-50-sparsegpt,int8", memfit.Context(calibration=windows))
    """

    name = "prune"
    forms = "prune-P-METHOD|prune-NofM-METHOD"
    summary = (
        "unstructured (P%) or N:M pruning of the decoder Linears, METHOD magnitude, wanda or sparsegpt; kept "
        "values plus a bitmask"
    )
    exportable = False
    phase = Phase.STRUCTURE
    # the kept values are packed beside a mask and frozen, and LoRA does not wrap the packed layer:
    # distillation would train only the norms and embeddings
    recovery = Recovery.NONE
    order = 4
    conflicts = ("mixed-bits", "w8a8")  # both choose per Linear from dense weights and inputs
    sqnr_floor_db = 3.0

    sparsity: int = 50
    group: int = 0
    method: PruneMethod = PruneMethod.WANDA
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        if not 1 <= self.sparsity <= 99:
            raise ValueError(f"sparsity must be a percent from 1 to 99, got {self.sparsity}")
        if self.group and (self.group not in GROUPS or self.group * self.sparsity % 100):
            raise ValueError(
                f"N:M needs M in {GROUPS} and a whole number pruned per group, got {self.sparsity}% of {self.group}"
            )

    @property
    def token(self) -> str:
        if self.group:
            kept = self.group * (100 - self.sparsity) // 100
            return f"prune-{kept}of{self.group}-{self.method.value}"
        return f"prune-{self.sparsity}-{self.method.value}"

    @property
    def needs_calibration(self) -> bool:
        return self.method is not PruneMethod.MAGNITUDE

    @classmethod
    def from_token(cls, token: str) -> Prune | None:
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        percent, kept, group, method = match.groups()
        if percent is not None:
            sparsity, group = int(percent), 0
        else:
            kept, group = int(kept), int(group)
            if group not in GROUPS or not 0 < kept < group:
                raise RecipeError(f"recipe token {token!r} is not N:M with 0 < N < M and M in {GROUPS}",
                                  "use for example prune-2of4-wanda or prune-4of8-sparsegpt")
            sparsity = 100 * (group - kept) // group
        try:
            return cls(sparsity=sparsity, group=group, method=PruneMethod(method))
        except ValueError as exc:
            raise RecipeError(f"recipe token {token!r}: {exc}", "use for example prune-50-wanda") from None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [
            cls(method=PruneMethod.MAGNITUDE),
            cls(method=PruneMethod.WANDA),
            cls(method=PruneMethod.SPARSEGPT),
            cls(group=4, method=PruneMethod.WANDA),
            cls(group=4, method=PruneMethod.SPARSEGPT),
            cls(sparsity=75, group=8, method=PruneMethod.MAGNITUDE),
        ]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # SparseGPT loses the least at 50% (docs/benchmarks.md); 2:4 holds the same bytes here
        # and loses more, so only unstructured is offered
        return [cls(method=PruneMethod.SPARSEGPT)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        parts = decoder_parts(model)
        calibrated = self.method is not PruneMethod.MAGNITUDE and (has_values(model) or ctx.source is not None)
        if calibrated:
            process, finish = self._prune_layer(parts.layers_fqn)
            calibration = ctx.calibration_for(self.token)
            calibrate_layers(model, calibration, process, ctx, f"{self.token}: pruning layers", finish)
        else:
            if ctx.source is not None:
                ctx.source.materialize(model)
            for index, layer in enumerate(parts.layers):
                for name, linear in self._targeted(layer, f"{parts.layers_fqn}.{index}").items():
                    if linear.weight.is_meta:
                        kept = kept_per_row(linear.in_features, self.sparsity, self.group)
                        pruned = SparseLinear.empty(linear.weight, kept, linear.bias)
                    else:
                        keep = keep_mask(magnitude_scores(linear.weight), self.sparsity, self.group)
                        kept = kept_per_row(linear.in_features, self.sparsity, self.group)
                        pruned = SparseLinear.from_dense(linear.weight, keep, linear.bias, kept)
                    set_submodule(layer, name, pruned)
                ctx.report(f"{self.token}: pruning layers", index + 1, len(parts.layers))
        return model

    def _targeted(self, layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
        return {
            name: m for name, m in layer.named_modules()
            if type(m) is nn.Linear and self.targets.matches(f"{prefix}.{name}")
        }

    def _prune_layer(self, layers_fqn: str):
        """``(process, finish)`` for `calibrate_layers`: process zeroes the pruned weights of a
        layer's Linears in place (the layer then runs dense to give the next layer its inputs),
        finish turns them into `SparseLinear`."""
        masks: dict[str, torch.Tensor] = {}

        def process(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            linears = self._targeted(layer, f"{layers_fqn}.{index}")
            if self.method is PruneMethod.SPARSEGPT:
                with InputStatistics(linears) as stats:
                    run_layer(layer, inputs)
                for name, linear in linears.items():
                    pruned, masks[name] = sparsegpt_prune(linear.weight, stats.hessian(name), self.sparsity, self.group)
                    linear.weight.data = pruned.to(linear.weight.dtype)
                return
            sums = {name: torch.zeros(m.in_features) for name, m in linears.items()}
            add = lambda name: lambda x: sums[name].add_(x.reshape(-1, x.shape[-1]).float().square().sum(dim=0))
            observe_inputs(layer, inputs, {m: add(name) for name, m in linears.items()})
            for name, linear in linears.items():
                masks[name] = keep_mask(wanda_scores(linear.weight, sums[name]), self.sparsity, self.group)
                linear.weight.data = linear.weight.data * masks[name]

        def finish(index: int, layer: nn.Module) -> None:
            for name, keep in masks.items():
                linear = layer.get_submodule(name)
                kept = kept_per_row(linear.in_features, self.sparsity, self.group)
                set_submodule(layer, name, SparseLinear.from_dense(linear.weight, keep, linear.bias, kept))
            masks.clear()

        return process, finish
