"""Precision casting: `Cast` to bf16 or fp16.

Casts parameters and persistent buffers that are still floating point after quantization (norms,
biases, unquantized layers). Non-persistent buffers such as rotary inverse frequencies stay in
fp32: they are tiny and rounding them shifts every position's angle.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.strategies.base import Phase, Strategy, register_field_type
from memfit.strategies.quantize.packed import PackedModule
from memfit.strategies.registry import register

if TYPE_CHECKING:
    from memfit.workload import Context, Workload


@register_field_type
class Precision(enum.Enum):
    """Floating-point formats a model can be cast to."""

    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Cast(Strategy):
    """Cast floating-point weights and activations to bf16 or fp16.

    Memory: halves every fp32 tensor still in floating point. Speed: bf16 prefill is about 2x fp32
    on CPUs with bf16 dot products (AVX512-BF16, AMX); fp16 matmuls are slow on most CPUs. Quality:
    bf16 costs little for inference; fp16 can overflow in models trained in bf16.

    Args:
        precision: the target format.
    """

    name = "cast"
    forms = "bf16|fp16"
    summary = "cast what is still floating point"
    phase = Phase.PRECISION
    sqnr_floor_db = 20.0

    precision: Precision = Precision.BF16

    @property
    def token(self) -> str:
        return self.precision.value

    @classmethod
    def from_token(cls, token: str) -> Cast | None:
        try:
            return cls(precision=Precision(token))
        except ValueError:
            return None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(precision=Precision.BF16), cls(precision=Precision.FP16)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # fp16 matmuls are slow on CPUs without fp16 units; offer fp16 only on accelerators.
        if workload.device == "cpu":
            return [cls(precision=Precision.BF16)]
        return cls.examples()

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        dtype = self.precision.dtype
        for module in model.modules():
            if isinstance(module, PackedModule):
                module.cast_(dtype)
                continue
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)  # keeps the Parameter object, so ties hold
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                    setattr(module, name, buffer.to(dtype))
        config = getattr(model, "config", None)
        if config is not None:
            config.dtype = dtype
        return model
