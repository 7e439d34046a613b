"""Precision casting: `Cast` to bf16 or fp16.

Casts parameters and persistent buffers that are still floating point after quantization (norms,
biases, unquantized layers). Non-persistent buffers such as rotary inverse frequencies stay in
fp32: they are tiny and rounding them shifts every position's angle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

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


class RecastLinears(TorchFunctionMode):
    """Under autocast, a linear with a trainable weight goes through `_CastedLinear`: the bf16
    input and the weight itself are saved for backward, where the weight is cast again, instead
    of a bf16 copy of every weight living from forward to backward (plain autocast's cost).

    Entered by `memfit.settings.RunSettings.forward`; activation checkpointing re-enters it for
    its recompute (`recompute_contexts`), so recomputed layers save the same tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            device = x.device.type
            if isinstance(weight, nn.Parameter) and weight.requires_grad and torch.is_grad_enabled() and (
                torch.is_autocast_enabled(device)
            ):
                return _CastedLinear.apply(x, weight, bias, torch.get_autocast_dtype(device))
        return func(*args, **kwargs)


class _CastedLinear(torch.autograd.Function):
    """``linear(x, W, b)`` computed in ``dtype`` that saves the input in ``dtype`` and the weight
    itself (no copy) for backward, where the weight is cast again: the same arithmetic as
    autocast's, without a low-precision copy of every weight alive between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        low = x.to(dtype)
        out = nn.functional.linear(low, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(low, weight)
        ctx.x_dtype, ctx.dtype, ctx.has_bias = x.dtype, dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        low, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        rows = grad.reshape(-1, grad.shape[-1])  # [M, N]
        if ctx.needs_input_grad[1]:
            grad_w = (rows.t() @ low.reshape(-1, low.shape[-1])).to(weight.dtype)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: a checkpointed layer that ran under
    `RecastLinears` recomputes under it too (autocast itself is restored by checkpoint)."""
    active = any(isinstance(mode, RecastLinears) for mode in _get_current_function_mode_stack())
    return contextlib.nullcontext(), (RecastLinears() if active else contextlib.nullcontext())
