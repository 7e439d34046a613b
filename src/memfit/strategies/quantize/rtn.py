"""Weight-only integer quantization: `Int8WeightOnly` and `Int4WeightOnly`, rounded to nearest
or by GPTQ, optionally after AWQ-style scaling.

Both cover every Linear layer, the token embedding and the output head, tied or not: in small and
mid-size LLMs the embedding holds a large share of the bytes (a fifth of SmolLM2-135M). A tied
embedding and head are quantized once and share their packed tensors.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.strategies.base import BlockOption, Phase, Strategy
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.awq import awq_scale_layer
from memfit.strategies.quantize.calibrated import Method, calibrated_layers_, has_values
from memfit.strategies.quantize.gptq import gptq_round
from memfit.strategies.quantize.grids import (
    fake_quantize_int4,
    fake_quantize_int8,
    int4_group_size,
    quantize_int4_groups,
    quantize_int8_rows,
)
from memfit.strategies.quantize.packed import Int4Linear, Int8Linear
from memfit.strategies.quantize.walk import quantize_model_
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets

if TYPE_CHECKING:
    from memfit.workload import Context, Workload


def int8_linear_from(linear: nn.Linear, hessian: torch.Tensor | None = None) -> Int8Linear:
    """``linear`` as int8; with a calibration ``hessian``, the codes are chosen by GPTQ on the
    same per-row grid instead of rounded to nearest."""
    q, scale = quantize_int8_rows(linear.weight)
    if hessian is not None:
        zero = torch.zeros_like(scale, dtype=torch.float32)[None]
        q = gptq_round(linear.weight, hessian, scale[None], zero, linear.in_features, -127, 127).to(torch.int8)
    bias = None if linear.bias is None else linear.bias.detach()
    return Int8Linear(q, scale, bias)


def int4_linear_from(
    linear: nn.Linear, group_size: int, hessian: torch.Tensor | None = None
) -> Int4Linear | Int8Linear:
    """``linear`` as 4-bit groups; with a calibration ``hessian``, GPTQ chooses the codes on the
    grids fitted to the original weights. An odd input width (a low-rank factor of odd rank, the
    kept values of an odd row) cannot pair its 4-bit values into bytes: such a layer is int8."""
    if linear.in_features % 2:
        return int8_linear_from(linear, hessian)
    group_size = int4_group_size(linear.in_features, group_size)
    q, scale, zero_point = quantize_int4_groups(linear.weight, group_size)
    if hessian is not None:
        q = gptq_round(linear.weight, hessian, scale, zero_point, group_size, 0, 15).to(torch.uint8)
    layout = kernels.int4_layout_for(linear.out_features, linear.in_features, group_size)
    bias = None if linear.bias is None else linear.bias.detach()
    return Int4Linear(layout.pack(q), scale, zero_point, group_size, layout, bias)


def int8_bytes(linear: nn.Linear) -> int:
    """Bytes `int8_linear_from` makes of ``linear``'s weight: a code per weight, a bf16 scale per row."""
    return linear.out_features * linear.in_features + 2 * linear.out_features


def int4_bytes(linear: nn.Linear, group_size: int) -> int:
    """Bytes `int4_linear_from` makes of ``linear``'s weight: two codes a byte, a bf16 scale and a
    uint8 zero point per group (int8's for an odd input width)."""
    n, k = linear.out_features, linear.in_features
    if k % 2:
        return int8_bytes(linear)
    return n * k // 2 + 3 * n * math.ceil(k / int4_group_size(k, group_size))


_METHOD_SUFFIX = {Method.RTN: "", Method.GPTQ: "-gptq"}


# -- strategies ---------------------------------------------------------------------------------
@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8WeightOnly(Strategy):
    """Weight-only int8, symmetric, one scale per output channel (round to nearest).

    Memory: a weight of N x K floats becomes N x K bytes plus N bf16 scales (about 26% of fp32).
    Speed: decode runs PyTorch's packed int8 kernel with bf16 activations (about 4x an fp32 matmul
    per layer on AVX-512); prefill dequantizes to the activation dtype. Quality: about +0.2%
    perplexity on SmolLM2-135M.

    Args:
        method: ``RTN`` rounds to nearest; ``GPTQ`` (token ``int8-gptq``) chooses the codes of the
            decoder layers' Linears on calibration text (same grid, same bytes).
        targets: which modules to quantize (default: every Linear, the embedding and the head).

    Example:
        >>> memfit.apply(model, memfit.Plan.parse("int8"))
    """

    name = "int8"
    forms = "int8[-gptq]"
    summary = "weight-only int8 per output channel (Linears, embedding, head); -gptq GPTQ codes"
    phase = Phase.QUANTIZE
    conflicts = ("int4",)
    sqnr_floor_db = 30.0

    method: Method = Method.RTN
    targets: Targets = Targets()

    @property
    def token(self) -> str:
        return "int8" + _METHOD_SUFFIX[self.method]

    @property
    def needs_calibration(self) -> bool:
        return self.method is Method.GPTQ

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return [cls()]  # round to nearest already costs int8 little (+0.2% on the demo)

    @classmethod
    def block_options(cls) -> list[BlockOption]:
        return [BlockOption("int8", fake_quantize_int8, int8_bytes, int8_linear_from)]

    @property
    def uniform_block(self) -> str | None:
        return "int8" if self.targets == Targets() else None

    @classmethod
    def from_token(cls, token: str) -> Int8WeightOnly | None:
        methods = {"int8": Method.RTN, "int8-gptq": Method.GPTQ}
        return cls(method=methods[token]) if token in methods else None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(method=Method.GPTQ)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.method is Method.GPTQ and (has_values(model) or ctx.source is not None):
            calibrated_layers_(
                model, ctx, self.targets, self.token,
                rtn_quantize=lambda fqn, linear: int8_linear_from(linear),
                gptq_quantize=lambda fqn, linear, hessian: int8_linear_from(linear, hessian),
            )
        return quantize_model_(model, ctx, self.targets, lambda fqn, linear: int8_linear_from(linear), self.token)


_INT4_TOKEN = re.compile(r"int4-g(\d+)(-awq)?(-gptq)?")
INT4_GROUP_SIZES = (32, 64, 128, 256)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4WeightOnly(Strategy):
    """Weight-only 4-bit, asymmetric (float zero point), in groups of input columns (round to nearest).

    Linear layers hold two values per byte plus a bf16 scale and a uint8 zero point per group:
    4 + 24 / group_size bits per weight (4.19 at groups of 128). Each group's grid is fitted by least
    squares (see `quantize_int4_groups`), which beats min-max rounding at no cost in bytes. The token
    embedding and output head are kept at int8 per row, as llama.cpp's 4-bit files keep them at
    higher precision: 4-bit rounding there costs small models more quality than it saves. When
    ``group_size`` does not divide a layer's input width (576 = 4.5 x 128 in SmolLM2), that layer
    uses the largest power-of-two group that does (64), and the recipe notes it; no layer is skipped.

    Speed: decode runs PyTorch's packed int4 kernel with bf16 activations; prefill dequantizes.
    Quality: round to nearest costs small models a lot at 4 bits; GPTQ (``int4-g128-gptq``)
    recovers much of it from calibration text (see docs/benchmarks.md).

    Args:
        group_size: input columns per (scale, zero) pair; smaller is more accurate and larger.
        method: ``RTN`` rounds to nearest; ``GPTQ`` chooses the decoder Linears' codes on
            calibration text, on the same grids (same bytes, same kernels).
        targets: which modules to quantize (default: every Linear, the embedding and the head).
    """

    name = "int4"
    forms = "int4-gN[-awq][-gptq]"
    summary = (
        "weight-only 4-bit, groups of N in {32, 64, 128, 256}; embedding and head int8; -awq activation-aware"
        " scales, -gptq GPTQ codes"
    )
    phase = Phase.QUANTIZE
    conflicts = ("int8",)
    sqnr_floor_db = 12.0

    group_size: int = 128
    method: Method = Method.RTN
    awq: bool = False
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")

    @property
    def token(self) -> str:
        return f"int4-g{self.group_size}{'-awq' if self.awq else ''}{_METHOD_SUFFIX[self.method]}"

    @property
    def needs_calibration(self) -> bool:
        return self.method is Method.GPTQ or self.awq

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # at groups of 128, GPTQ holds the same bytes as round to nearest and loses far less
        # (+9.2% perplexity on the demo against +34.8%), so it replaces it
        return [cls(group_size=32), cls(group_size=64), cls(group_size=128, method=Method.GPTQ)]

    @classmethod
    def block_options(cls) -> list[BlockOption]:
        """4-bit groups of 32, 64 and 128, the sizes the planner tries whole (each option costs
        the per-block scoring one more run per block)."""
        return [_int4_option(g) for g in INT4_GROUP_SIZES if g <= 128]

    @property
    def uniform_block(self) -> str | None:
        return f"int4-g{self.group_size}" if self.targets == Targets() and self.group_size <= 128 else None

    @classmethod
    def from_token(cls, token: str) -> Int4WeightOnly | None:
        match = _INT4_TOKEN.fullmatch(token)
        if match is None:
            return None
        group_size = int(match.group(1))
        if group_size not in INT4_GROUP_SIZES:
            raise RecipeError(
                f"recipe token {token!r} asks for groups of {group_size}",
                f"use one of {', '.join(f'int4-g{g}' for g in INT4_GROUP_SIZES)}",
            )
        method = Method.GPTQ if match.group(3) else Method.RTN
        return cls(group_size=group_size, awq=bool(match.group(2)), method=method)

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(group_size=g) for g in (32, 64, 128)] + [
            cls(group_size=128, method=Method.GPTQ), cls(group_size=128, awq=True)
        ]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
        for width in widths:
            if width % 2:
                ctx.note(f"{self.token}: layers with odd input width {width} are int8 (4-bit values pair into bytes)")
                continue
            size = int4_group_size(width, self.group_size)
            if width % self.group_size == 0:
                continue
            what = f"groups of {size}" if width % size == 0 else f"a shorter last group of {width % size}"
            ctx.note(f"{self.token}: layers with input width {width} (not a multiple of {self.group_size}) use {what}")
        quantize = lambda fqn, linear: int4_linear_from(linear, self.group_size)
        if self.needs_calibration and (has_values(model) or ctx.source is not None):
            fake = lambda weight: fake_quantize_int4(weight, self.group_size)
            awq = lambda layer, inputs, groups: list(awq_scale_layer(layer, inputs, fake, groups))
            gptq = lambda fqn, linear, hessian: int4_linear_from(linear, self.group_size, hessian)
            calibrated_layers_(
                model, ctx, self.targets, self.token, rtn_quantize=quantize,
                scale_layer=awq if self.awq else None,
                gptq_quantize=gptq if self.method is Method.GPTQ else None,
            )
        return quantize_model_(model, ctx, self.targets, quantize, self.token)


def _int4_option(group_size: int) -> BlockOption:
    return BlockOption(
        f"int4-g{group_size}",
        lambda weight: fake_quantize_int4(weight, group_size),
        lambda linear: int4_bytes(linear, group_size),
        lambda linear, hessian: int4_linear_from(linear, group_size, hessian),
    )
