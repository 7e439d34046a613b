"""Calibrated quantization: decoder layers processed one at a time on calibration activations.

`calibrated_layers_` drives AWQ-style scaling (`memfit.strategies.quantize.awq`) and GPTQ
(`memfit.strategies.quantize.gptq`) for any strategy that supplies the per-Linear quantizers; a streamed
model (``Context.source``) is read from its checkpoint layer by layer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.models.arch import decoder_parts
from memfit.strategies.base import register_field_type
from memfit.strategies.layerwise import InputStatistics, LayerInputs, calibrate_layers, run_layer
from memfit.strategies.quantize.awq import ScaleGroup, scale_groups
from memfit.strategies.quantize.packed import Int8Linear
from memfit.strategies.quantize.walk import pack_embeddings_, set_submodule

if TYPE_CHECKING:
    from memfit.strategies.targets import Targets
    from memfit.workload import Context


@register_field_type
class Method(enum.Enum):
    """How integer codes are chosen on a grid: round to nearest, or GPTQ (calibrated)."""

    RTN = "rtn"
    GPTQ = "gptq"


def calibrated_layers_(
    model: nn.Module,
    ctx: Context,
    targets: Targets,
    label: str,
    *,
    rtn_quantize: Callable[[str, nn.Linear], nn.Module],
    scale_layer: Callable[[nn.Module, LayerInputs, list[ScaleGroup]], list[str]] | None = None,
    gptq_quantize: Callable[[str, nn.Linear, torch.Tensor], nn.Module] | None = None,
    head_class: type[Int8Linear] = Int8Linear,
) -> None:
    """Calibrate the decoder layers one at a time, each on the inputs the already processed
    layers before it produce.

    Args:
        rtn_quantize: ``(fqn, linear) -> module``; packs the targeted Linears still in float as
            soon as their layer is done, so a streamed model never holds more than one float layer.
        scale_layer: ``(layer, inputs, groups) -> names of the groups scaled``; folds per-channel
            scales into the layer's targeted groups (AWQ's search, SmoothQuant's smoothing).
        gptq_quantize: ``(fqn, linear, hessian) -> module``; replaces the targeted Linears by
            GPTQ-rounded modules, from the Hessians of their calibration inputs.
        head_class: the int8 module of the output head; the embedding and head are packed as soon
            as the first layer's inputs are captured (`memfit.strategies.quantize.walk.pack_embeddings_`).
    """
    calibration = ctx.calibration_for(label)
    prefix = decoder_parts(model).layers_fqn
    unscaled: set[str] = set()
    unobserved: set[str] = set()

    def targeted(index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        return {
            name: m for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and targets.matches(f"{prefix}.{index}.{name}")
        }

    def process(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        linears = targeted(index, layer)
        if scale_layer is not None:
            chosen = set(linears.values())
            groups = [g for g in scale_groups(layer) if all(m in chosen for m in g.linears)]
            scaled = scale_layer(layer, inputs, groups)
            unscaled.update(g.name for g in groups if g.name not in scaled)
        if gptq_quantize is not None:
            with InputStatistics(linears) as stats:
                run_layer(layer, inputs)
            for name, linear in linears.items():
                if not stats.observed(name):  # held as storage, never called (a pruned layer's kept values)
                    unobserved.add(name)
                    continue
                set_submodule(layer, name, gptq_quantize(f"{prefix}.{index}.{name}", linear, stats.hessian(name)))

    def finish(index: int, layer: nn.Module) -> None:
        for name, linear in targeted(index, layer).items():
            set_submodule(layer, name, rtn_quantize(f"{prefix}.{index}.{name}", linear))

    calibrate_layers(model, calibration, process, ctx, f"{label}: calibrating layers", finish,
                     after_capture=lambda: pack_embeddings_(model, targets, head_class, loaded_only=True))
    if unobserved:
        ctx.note(f"{label}: {sorted(unobserved)} are the kept values of pruned layers and are rounded to nearest")
    if unscaled:
        ctx.note(f"{label}: groups {sorted(unscaled)} not scaled (their input comes from a norm that does not "
                 "multiply by its weight)")


def has_values(model: nn.Module) -> bool:
    """True unless the model's parameters are on the meta device (a dry run)."""
    return not any(p.is_meta for p in model.parameters())
