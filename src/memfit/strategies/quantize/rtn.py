"""Round-to-nearest weight-only quantization: `Int8WeightOnly` and `Int4WeightOnly`.

Both cover every Linear layer, the token embedding and the output head, tied or not: in small and
mid-size LLMs the embedding holds a large share of the bytes (a fifth of SmolLM2-135M). A tied
embedding and head are quantized once and share their packed tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.calibration.gptq import gptq_round
from memfit.errors import RecipeError
from memfit.strategies.base import Phase, Strategy, register_field_type
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.packed import Int4Linear, Int8Embedding, Int8Linear
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets

if TYPE_CHECKING:
    from memfit.plan import Context, Workload


# -- the arithmetic -----------------------------------------------------------------------------
_CHUNK_VALUES = 1 << 22  # rows are rounded in chunks of about this many values (16 MB of fp32)

def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: weight [N, K] -> (int8 [N, K], bf16 scales [N]).

    The scale is rounded to bf16 before the weights are rounded against it, so the stored pair
    reproduces exactly the grid the weights were rounded to.
    """
    weight = weight.detach()
    rows = max(1, _CHUNK_VALUES // max(1, weight.shape[1]))  # bounded float temporaries
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].float()
        absmax = w.abs().amax(dim=1)
        scale[start : start + rows] = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        q[start : start + rows] = (w / scale[start : start + rows].float()[:, None]).round().clamp(-127, 127)
    return q, scale


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int, *, shrink: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8), refits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of input columns, with a least-squares fit of each group's grid.

    ``W ~ (q - zero_point) * scale`` with q and the integer zero point in 0..15. For each group, a
    few clipping ranges (the min-max range shrunk by ``shrink``) seed the grid; each is refined by
    ``refits`` rounds of rounding and a least-squares refit of the scale (as llama.cpp's k-quants
    do), and the grid with the lowest squared error wins. No calibration data is used. When
    ``group_size`` does not divide K the last group is shorter.

    Returns:
        (values 0..15 as uint8 [N, K], bf16 scales [G, N], uint8 zero points [G, N]).
    """
    w = weight.detach().float()
    if w.is_meta:  # the search changes values, never shapes: skip it when there are no values
        shrink, refits = (1.0,), 0
    n, k = w.shape
    num_groups = math.ceil(k / group_size)
    pad = num_groups * group_size - k
    if pad:  # padded columns repeat the last one and get zero weight in the fit
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    x = w.view(n, num_groups, group_size)  # [N, G, group]
    mask = torch.ones(num_groups * group_size, device=w.device)
    mask[k:] = 0
    mask = mask.view(num_groups, group_size)
    low, high = x.amin(dim=-1), x.amax(dim=-1)  # [N, G]
    best_err = best_scale = best_zero = None
    for factor in shrink:
        mid, half = (low + high) / 2, (high - low) / 2 * factor
        scale = (2 * half / 15).clamp(min=1e-10)
        zero = (-(mid - half) / scale).round().clamp(0, 15)
        for _ in range(refits):
            d = (_round_int4(x, scale, zero) - zero[..., None]) * mask  # [N, G, group]
            num, den = (d * x).sum(-1), (d * d).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-12), scale).clamp(min=1e-10)
        err = ((((_round_int4(x, scale, zero) - zero[..., None]) * scale[..., None]) - x) ** 2 * mask).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    scale = best_scale.to(torch.bfloat16)  # round the scale first, then the weights against it
    q = _round_int4(x, scale.float(), best_zero).to(torch.uint8).view(n, num_groups * group_size)[:, :k]
    return q, scale.t().contiguous(), best_zero.to(torch.uint8).t().contiguous()


def _round_int4(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return ((x / scale[..., None]).round() + zero[..., None]).clamp(0, 15)


def int4_group_size(in_features: int, group_size: int) -> int:
    """The group size a layer gets: ``group_size``, or when it does not divide ``in_features``
    (576 = 4.5 x 128), the largest power of two below it that does, if at least 32; otherwise
    ``group_size`` with a shorter last group."""
    size = group_size
    while in_features % size and size > 32:
        size //= 2
    return size if in_features % size == 0 else group_size


def int8_linear_from(linear: nn.Linear, hessian: torch.Tensor | None = None) -> Int8Linear:
    """``linear`` as int8; with a calibration ``hessian``, the codes are chosen by GPTQ on the
    same per-row grid instead of rounded to nearest."""
    q, scale = quantize_int8_rows(linear.weight)
    if hessian is not None:
        zero = torch.zeros_like(scale, dtype=torch.float32)[None]
        q = gptq_round(linear.weight, hessian, scale[None], zero, linear.in_features, -127, 127).to(torch.int8)
    bias = None if linear.bias is None else linear.bias.detach()
    return Int8Linear(q, scale, bias)


def int4_linear_from(linear: nn.Linear, group_size: int, hessian: torch.Tensor | None = None) -> Int4Linear:
    """``linear`` as 4-bit groups; with a calibration ``hessian``, GPTQ chooses the codes on the
    grids fitted to the original weights."""
    group_size = int4_group_size(linear.in_features, group_size)
    q, scale, zero_point = quantize_int4_groups(linear.weight, group_size)
    if hessian is not None:
        q = gptq_round(linear.weight, hessian, scale, zero_point, group_size, 0, 15).to(torch.uint8)
    layout = kernels.int4_layout_for(linear.out_features, linear.in_features, group_size)
    bias = None if linear.bias is None else linear.bias.detach()
    return Int4Linear(layout.pack(q), scale, zero_point, group_size, layout, bias)


# -- walking the model --------------------------------------------------------------------------
def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model_(model: nn.Module, ctx: Context, targets: Targets, quantize_linear, label: str) -> nn.Module:
    """Replace targeted Linear layers with ``quantize_linear(layer)``, and the embedding and output
    head with int8, one layer at a time so only one layer's float temporaries exist at once."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if get_in else None
    head = get_out() if get_out else None
    names = {id(m): fqn for fqn, m in model.named_modules()}
    emb_fqn, head_fqn = names.get(id(embedding)), names.get(id(head))
    do_embedding = isinstance(embedding, nn.Embedding) and targets.matches(emb_fqn)
    do_head = isinstance(head, nn.Linear) and targets.matches(head_fqn)
    tied = do_embedding and do_head and head.weight is embedding.weight
    linears = [
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head and targets.matches(fqn)
    ]
    total = len(linears) + do_embedding + do_head
    for done, fqn in enumerate(linears):
        _set_submodule(model, fqn, quantize_linear(model.get_submodule(fqn)))
        ctx.report(f"{label}: layers", done + 1, total)
    if do_embedding:
        q, scale = quantize_int8_rows(embedding.weight)
        new_embedding = Int8Embedding(q, scale, embedding.weight.dtype, embedding.padding_idx)
        _set_submodule(model, emb_fqn, new_embedding)
        if tied:  # one copy of the packed table serves both
            _set_submodule(model, head_fqn, Int8Linear(q, scale, head.bias))
    if do_head and not tied:
        _set_submodule(model, head_fqn, int8_linear_from(head))
    ctx.report(f"{label}: layers", total, total)
    return model


# -- calibrated rounding ------------------------------------------------------------------------
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
    awq_fake_quantize=None,
    gptq_quantize=None,
    rtn_quantize=None,
) -> None:
    """Calibrate the decoder layers one at a time, each on the inputs the already processed
    layers before it produce: with ``awq_fake_quantize``, search and fold activation-aware scales
    (`memfit.calibration.awq`); with ``gptq_quantize(linear, hessian)``, replace the targeted
    Linears by GPTQ-rounded modules. Targeted Linears left in float are then packed with
    ``rtn_quantize(linear)`` as soon as their layer is done, so a streamed model never holds more
    than one float layer."""
    from memfit.calibration.awq import awq_scale_layer, scale_groups
    from memfit.calibration.layerwise import InputStatistics, calibrate_layers, run_layer
    from memfit.models.arch import decoder_parts

    if ctx.calibration is None:
        raise RecipeError(
            f"{label} needs calibration text",
            "memfit compress and optimize supply it; in Python pass "
            "memfit.Context(calibration=memfit.calibration.calibration_windows(tokenizer))",
        )
    prefix = decoder_parts(model).layers_fqn
    unscaled: set[str] = set()

    def process(index: int, layer: nn.Module, inputs) -> None:
        names = {id(m): f"{prefix}.{index}.{n}" for n, m in layer.named_modules()}
        if awq_fake_quantize is not None:
            groups = [g for g in scale_groups(layer) if all(targets.matches(names[id(m)]) for m in g.linears)]
            chosen = awq_scale_layer(layer, inputs, awq_fake_quantize, groups)
            unscaled.update(g.name for g in groups if g.name not in chosen)
        if gptq_quantize is not None:
            linears = {
                name: m for name, m in layer.named_modules()
                if isinstance(m, nn.Linear) and targets.matches(f"{prefix}.{index}.{name}")
            }
            with InputStatistics(linears) as stats:
                run_layer(layer, inputs)
            for name, linear in linears.items():
                _set_submodule(layer, name, gptq_quantize(linear, stats.hessian(name)))

    def finish(index: int, layer: nn.Module) -> None:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and targets.matches(f"{prefix}.{index}.{name}"):
                _set_submodule(layer, name, rtn_quantize(module))

    calibrate_layers(model, ctx.calibration, process, ctx, f"{label}: calibrating layers", finish)
    if unscaled:
        ctx.note(f"{label}: groups {sorted(unscaled)} not scaled (their input comes from a norm that does not "
                 "multiply by its weight)")


def _has_values(model: nn.Module) -> bool:
    return not any(p.is_meta for p in model.parameters())


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
    def from_token(cls, token: str) -> Int8WeightOnly | None:
        methods = {"int8": Method.RTN, "int8-gptq": Method.GPTQ}
        return cls(method=methods[token]) if token in methods else None

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(), cls(method=Method.GPTQ)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.method is Method.GPTQ and (_has_values(model) or ctx.source is not None):
            calibrated_layers_(model, ctx, self.targets, self.token, gptq_quantize=int8_linear_from,
                               rtn_quantize=int8_linear_from)
        return quantize_model_(model, ctx, self.targets, int8_linear_from, self.token)


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

    def _fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round ``weight`` to this strategy's grid and back (min-max grid: AWQ's search needs
        only to rank scales, and the least-squares fit would cost twenty times more)."""
        size = int4_group_size(weight.shape[1], self.group_size)
        q, scale, zero = quantize_int4_groups(weight, size, shrink=(1.0,), refits=0)
        columns = torch.arange(weight.shape[1]) // size
        return (q.float() - zero.float().t()[:, columns]) * scale.float().t()[:, columns]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
        for width in widths:
            size = int4_group_size(width, self.group_size)
            if width % self.group_size == 0:
                continue
            what = f"groups of {size}" if width % size == 0 else f"a shorter last group of {width % size}"
            ctx.note(f"{self.token}: layers with input width {width} (not a multiple of {self.group_size}) use {what}")
        quantize = lambda linear: int4_linear_from(linear, self.group_size)
        if self.needs_calibration and (_has_values(model) or ctx.source is not None):
            gptq = lambda linear, hessian: int4_linear_from(linear, self.group_size, hessian)
            calibrated_layers_(
                model, ctx, self.targets, self.token,
                awq_fake_quantize=self._fake_quantize if self.awq else None,
                gptq_quantize=gptq if self.method is Method.GPTQ else None,
                rtn_quantize=quantize,
            )
        return quantize_model_(model, ctx, self.targets, quantize, self.token)
