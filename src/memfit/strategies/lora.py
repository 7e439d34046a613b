"""LoRA adapters through peft, on plain and on memfit-quantized Linears.

peft wraps each targeted layer in place (``inject_adapter_in_model``): the original module becomes
``base_layer`` and two small Linears ``lora_A``/``lora_B`` add their product. memfit's packed
modules (`Int8Linear`, `Int4Linear`, ...) are registered with peft as Linear-like layers, so a
quantized base takes adapters the same way as a float one (QLoRA-style).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.quantize.packed import Int4Linear, Int8Linear, PackedModule


def _targets(model: nn.Module) -> list[str]:
    """Names of every Linear-like module inside the decoder layers (not the embedding or head)."""
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not layers:
        return []
    prefix = layers[0] + "."
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix)
        and (type(module) is nn.Linear or (isinstance(module, PackedModule) and hasattr(module, "in_features")))
    ]


def adapter_dtype(model: nn.Module, targets: list[str]) -> torch.dtype:
    """fp32 adapters on an fp32 float base; bf16 on a quantized or half-precision base."""
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, PackedModule) or module.weight.dtype != torch.float32:
            return torch.bfloat16
    return torch.float32


def inject(model: nn.Module, rank: int, alpha: int) -> None:
    """Add LoRA adapters of ``rank`` to every Linear of the decoder layers and freeze the rest.

    Raises:
        RecipeError: the model has no decoder layers with Linear modules.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    targets = _targets(model)
    if not targets:
        raise RecipeError(f"{type(model).__name__} has no Linear layers for LoRA", "remove the lora token")
    dtype = adapter_dtype(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    config._register_custom_module({cls: LoraLinear for cls in _packed_linear_classes()})
    for param in model.parameters():
        param.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns about layer types it does not know; memfit registered them
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(dtype)
            param.requires_grad_(True)


def _packed_linear_classes() -> list[type]:
    classes, stack = [], [Int8Linear, Int4Linear]
    while stack:
        cls = stack.pop()
        classes.append(cls)
        stack.extend(cls.__subclasses__())
    return classes
