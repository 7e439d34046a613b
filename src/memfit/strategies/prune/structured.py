"""Structured pruning: whole MLP channels, attention heads (key/value groups) and decoder layers
removed, the Linears physically shrunk and the config rewritten.

Nothing is masked: the weights hold fewer rows and columns and ``config.json`` says so, so a saved
model is a standard checkpoint that plain ``transformers.AutoModelForCausalLM.from_pretrained``
loads (and any runtime serves) at its smaller size, and the matmuls shrink with it. What goes is
chosen on calibration text, decoder layer by decoder layer on the outputs of the already pruned
layers before it (as GPTQ does). On meta tensors (a dry run, `memfit.estimate`) the first channels,
groups or layers are kept: the shapes and config are those of a real run, only the choice differs.

Pruned models lose quality quickly without retraining; fine-tuning or distillation afterwards
recovers much of it (Minitron, ShortGPT). The module and parameter names are those of Llama-style decoders (Llama,
Mistral, Qwen2, SmolLM): ``mlp.{gate,up,down}_proj`` and ``self_attn.{q,k,v,o}_proj``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import RecipeError
from memfit.memory.fake import value_or
from memfit.models.arch import LLAMA, decoder_parts
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.layerwise import calibrate_layers, observe_inputs
from memfit.strategies.quantize.calibrated import has_values
from memfit.strategies.registry import register
from memfit.workload import Mode

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from memfit.strategies.layerwise import LayerInputs
    from memfit.workload import Context, Workload

_MLP = (LLAMA.mlp, LLAMA.mlp_linears)
_ATTENTION = (LLAMA.attention, LLAMA.attention_linears)

LayerPrune = Callable[[int, nn.Module, "LayerInputs | None"], None]
"""``prune(index, layer, inputs)``: shrink one decoder layer; ``inputs`` is None on meta tensors."""


# -- shared mechanics ---------------------------------------------------------------------------
def num_removed(percent: int, total: int) -> int:
    """``percent``% of ``total`` rounded half up, at least 1 and at most ``total - 1``."""
    return min(max((percent * total + 50) // 100, 1), total - 1)


def shrink_linear_(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    """Keep the rows (``dim=0``, outputs, with the bias) or columns (``dim=1``, inputs) ``keep``
    of ``linear``, in place; dtype, device and ``requires_grad`` stay."""
    keep = keep.to(linear.weight.device)
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach().index_select(dim, keep), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.detach().index_select(0, keep), requires_grad=bias.requires_grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _kept(scores: torch.Tensor | None, num_keep: int) -> torch.Tensor:
    """Indices of the ``num_keep`` highest ``scores``, in their original order; without scores
    (meta tensors) the first ``num_keep``."""
    if scores is None:
        return torch.arange(num_keep)
    return torch.argsort(scores, descending=True, stable=True)[:num_keep].sort().values


def _output_energy(layer: nn.Module, inputs: LayerInputs, linear: nn.Linear) -> torch.Tensor:
    """Each input channel's expected contribution to ``linear``'s output energy over the
    calibration tokens, E[x_j^2] x ||W[:, j]||^2 (channels taken as uncorrelated): [in_features]."""
    total = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)
    rows = [0]

    def observe(x: torch.Tensor) -> None:  # x: [B, T, in_features]
        flat = x.reshape(-1, x.shape[-1])
        total.add_(flat.double().square().sum(dim=0))
        rows[0] += flat.shape[0]

    observe_inputs(layer, inputs, {linear: observe})
    return (total / max(rows[0], 1)).float() * linear.weight.detach().float().square().sum(dim=0)


def _text_config(model: nn.Module, label: str) -> PretrainedConfig:
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_heterogeneous", False):
        raise RecipeError(
            f"{label}: {type(config).__name__} has per-layer overrides (per_layer_config)",
            "structured pruning supports models whose decoder layers share one config",
        )
    return config


def _block(layer: nn.Module, index: int, spec: tuple[str, tuple[str, ...]], label: str) -> tuple[nn.Module, ...]:
    """``(parent, *linears)`` of a decoder layer, checked to be plain float Linears."""
    parent_name, names = spec
    parent = getattr(layer, parent_name, None)
    linears = tuple(getattr(parent, name, None) for name in names)
    if any(type(m) is not nn.Linear for m in linears):
        found = ", ".join(f"{name}: {type(m).__name__}" for name, m in zip(names, linears, strict=True))
        raise RecipeError(
            f"{label}: decoder layer {index} has no float Linears {parent_name}.{{{','.join(names)}}} ({found})",
            "structured pruning runs before quantization (put both in one recipe) on Llama-style decoders",
        )
    return (parent, *linears)


def _each_layer_(model: nn.Module, ctx: Context, label: str, prune: LayerPrune) -> None:
    """Call ``prune`` on every decoder layer: with the inputs the already pruned layers before it
    produce on calibration text, or with None on meta tensors."""
    if has_values(model) or ctx.source is not None:
        calibrate_layers(model, ctx.calibration_for(label), prune, ctx, f"{label}: pruning layers")
        return
    layers = decoder_parts(model).layers
    for index, layer in enumerate(layers):
        prune(index, layer, None)
        ctx.report(f"{label}: pruning layers", index + 1, len(layers))


# -- strategies ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Shrink(Strategy):
    """What the three strategies share: one integer field, written as the token's number
    (``prune-mlp-25``), calibration text to choose what goes, and a result held in the config."""

    phase = Phase.STRUCTURE
    in_config = True

    @property
    def token(self) -> str:
        return f"{self.name}-{getattr(self, dataclasses.fields(self)[0].name)}"

    @property
    def needs_calibration(self) -> bool:
        return True

    @classmethod
    def from_token(cls, token: str) -> Strategy | None:
        match = re.fullmatch(rf"{re.escape(cls.name)}-(\d+)", token)
        if match is None:
            return None
        try:
            return cls(**{dataclasses.fields(cls)[0].name: int(match.group(1))})
        except ValueError as exc:
            raise RecipeError(f"recipe token {token!r}: {exc}", f"use for example {cls.examples()[0].token}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ShrinkShare(_Shrink):
    """A share of every layer's channels or heads removed: ``percent`` from 1 to 90."""

    percent: int = 25

    def __post_init__(self) -> None:
        if not 1 <= self.percent <= 90:
            raise ValueError(f"percent must be from 1 to 90, got {self.percent}")


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneMlp(_ShrinkShare):
    """Remove a share of the MLP's intermediate channels, the same number in every decoder layer.

    Channel j is row j of gate_proj and up_proj and column j of down_proj. Its importance is its
    expected contribution to the MLP's output energy, E[h_j^2] x ||W_down[:, j]||^2 (h: the input
    of down_proj), on calibration text; the kept channels stay in their order and
    ``config.intermediate_size`` is rewritten. Follows the width pruning of Minitron
    (https://arxiv.org/abs/2407.14679), with the output energy as the score.

    Memory: a channel holds 3 x hidden values per layer; on SmolLM2-135M 25% of the channels is
    15% of the weights. Speed: the MLP's matmuls shrink by the same share. Quality without
    retraining, SmolLM2-135M at 25%: perplexity 14.7 -> 19.5 (+32%; 4,096 evaluation tokens,
    8 calibration windows of 512), against int8's +0.2% for a larger saving.

    Args:
        percent: percent of the intermediate channels removed, 1 to 90 (rounded to whole
            channels; at least one goes, at least one stays).

    Example:
        >>> memfit.apply(model, "prune-mlp-25", memfit.Context(calibration=windows))
    """

    name = "prune-mlp"
    forms = "prune-mlp-P"
    summary = "structured: remove P% of the MLP channels (smaller Linears, plain HF checkpoint)"
    order = 2
    sqnr_floor_db = 15.0  # tiny models: 23.6 dB (Llama), 22.5 dB (Qwen2) at 25%

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(percent=25)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        return [cls(percent=25)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        config = _text_config(model, self.token)
        for index, layer in enumerate(decoder_parts(model).layers):
            _block(layer, index, _MLP, self.token)
        size = config.intermediate_size
        num_keep = size - num_removed(self.percent, size)
        if (size - num_keep) * 100 != self.percent * size:
            ctx.note(f"{self.token}: removes {size - num_keep} of {size} MLP channels per layer")

        def prune(index: int, layer: nn.Module, inputs: LayerInputs | None) -> None:
            mlp, gate, up, down = _block(layer, index, _MLP, self.token)
            scores = None if inputs is None else _output_energy(layer, inputs, down)
            keep = _kept(scores, num_keep)
            shrink_linear_(gate, 0, keep)
            shrink_linear_(up, 0, keep)
            shrink_linear_(down, 1, keep)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = num_keep

        _each_layer_(model, ctx, self.token, prune)
        config.intermediate_size = num_keep
        return model


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneHeads(_ShrinkShare):
    """Remove whole key/value groups of attention heads, the same number in every decoder layer.

    Under grouped-query attention a group is one key/value head and the query heads sharing it,
    so removing groups keeps ``num_attention_heads / num_key_value_heads``: round(percent% of the
    groups) go, at least one and never all, and the share actually removed is noted when it
    differs (SmolLM2-135M has 3 groups: ``prune-heads-25`` removes one, 33% of the heads). A
    group's importance is the sum over its channels (the o_proj inputs of its query heads) of
    E[x_c^2] x ||W_o[:, c]||^2, its expected contribution to the attention output energy, on
    calibration text. q/k/v_proj lose rows (and biases), o_proj columns; the config gets the new
    head counts and an explicit ``head_dim`` (unchanged; Llama would derive it from the count).

    Memory: the attention weights shrink by the removed share, and so does the KV cache: at
    ``prune-heads-25`` on SmolLM2-135M the cache falls by a third and the weights by 7%, which
    makes it a generation (long context) option more than a weight one. Speed: attention and its
    projections shrink with it. Quality without retraining, SmolLM2-135M at 25% (33%): perplexity
    14.7 -> 30.9 (+110%; measured as for `PruneMlp`).

    Args:
        percent: percent of the heads removed, 1 to 90 (rounded to whole key/value groups).

    Example:
        >>> memfit.apply(model, "prune-heads-25", memfit.Context(calibration=windows))
    """

    name = "prune-heads"
    forms = "prune-heads-P"
    summary = "structured: remove P% of the attention heads as whole key/value groups"
    order = 1
    sqnr_floor_db = 5.0  # tiny models: 7.1 dB (Llama), 7.6 dB (Qwen2) at 50%

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(percent=50)]  # the tiny models have 2 groups: 25% would round to one too

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # on weights alone prune-mlp-25 saves more for less perplexity (docs/benchmarks.md); heads
        # are worth it where the KV cache counts, in generation
        return [cls(percent=25)] if workload.mode is Mode.GENERATE else []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        config = _text_config(model, self.token)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        attention = _block(decoder_parts(model).layers[0], 0, _ATTENTION, self.token)
        head_dim = getattr(attention[0], "head_dim", None) or attention[1].out_features // heads
        if kv_heads < 2:
            raise RecipeError(
                f"{self.token}: the model has {kv_heads} key/value head, which cannot be split",
                "prune MLP channels (prune-mlp-25) or layers (drop-layers-N) instead",
            )
        for index, layer in enumerate(decoder_parts(model).layers):
            _, q, k, v, o = _block(layer, index, _ATTENTION, self.token)
            if q.out_features != heads * head_dim or {k.out_features, v.out_features} != {kv_heads * head_dim}:
                raise RecipeError(
                    f"{self.token}: layer {index}'s q/k/v shapes do not match {heads} heads of "
                    f"{head_dim} and {kv_heads} key/value heads",
                    "check the model's config",
                )
        group_size = heads // kv_heads  # query heads per key/value head
        removed = num_removed(self.percent, kv_heads)
        num_keep = kv_heads - removed
        if removed * 100 != self.percent * kv_heads:
            ctx.note(
                f"{self.token}: removes {removed} of {kv_heads} key/value groups per layer "
                f"({100 * removed / kv_heads:.0f}% of the heads; the {group_size} query heads of a group go together)"
            )

        def prune(index: int, layer: nn.Module, inputs: LayerInputs | None) -> None:
            attn, q, k, v, o = _block(layer, index, _ATTENTION, self.token)
            scores = None
            if inputs is not None:  # o_proj's inputs are the heads' outputs, group by group
                scores = _output_energy(layer, inputs, o).view(kv_heads, group_size * head_dim).sum(dim=1)
            groups = _kept(scores, num_keep)
            query = _blocks(groups, group_size * head_dim)  # the channels of the kept query heads
            key_value = _blocks(groups, head_dim)
            for linear, dim, keep in ((q, 0, query), (k, 0, key_value), (v, 0, key_value), (o, 1, query)):
                shrink_linear_(linear, dim, keep)
            # transformers 5.x Llama and Qwen2 attention cache only head_dim and
            # num_key_value_groups, which whole groups leave as they are; older ones the counts
            for attr, count in (("num_heads", num_keep * group_size), ("num_key_value_heads", num_keep)):
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, count)

        _each_layer_(model, ctx, self.token, prune)
        config.num_attention_heads = num_keep * group_size
        config.num_key_value_heads = num_keep
        config.head_dim = head_dim
        return model


def _blocks(indices: torch.Tensor, width: int) -> torch.Tensor:
    """The channels of blocks ``indices`` of ``width`` consecutive channels: [len(indices) * width]."""
    return (indices[:, None] * width + torch.arange(width, device=indices.device)).flatten()


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class DropLayers(_Shrink):
    """Remove whole decoder layers: those that change their input least (ShortGPT).

    A layer's block influence is 1 - cos(input, output) of its hidden states, averaged over the
    calibration tokens, measured in one pass over the unpruned model; the ``num_layers`` lowest
    go (https://arxiv.org/abs/2403.03853). The remaining layers are renumbered (``layer_idx``, the
    KV-cache slot), ``config.num_hidden_layers`` is rewritten and per-layer config lists
    (``layer_types``) keep the kept layers' entries; which layers went is noted.

    Memory: each layer dropped removes its weights and its share of the KV cache (SmolLM2-135M:
    2.6% of the weights per layer of 30). Speed: a forward does that much less work. Quality
    without retraining, SmolLM2-135M: perplexity 14.7 -> 16.5 (+12%) for one layer, 24.3 (+65%)
    for four (10.5% of the weights; measured as for `PruneMlp`).

    Args:
        num_layers: decoder layers removed, at least 1 and fewer than the model has (checked
            when applied).

    Raises:
        RecipeError: (when applied) ``num_layers`` is not fewer than the model's layers.

    Example:
        >>> memfit.apply(model, "drop-layers-4", memfit.Context(calibration=windows))
    """

    name = "drop-layers"
    forms = "drop-layers-N"
    summary = "structured: remove the N decoder layers that change their input least"
    order = 0
    sqnr_floor_db = 4.0  # tiny models, one of two layers: 6.2 dB (Llama), 6.3 dB (Qwen2)

    num_layers: int = 1

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")

    @classmethod
    def examples(cls) -> list[Strategy]:
        return [cls(num_layers=1)]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # a count of layers means nothing without the model (1 of 2 halves it, 1 of 32 barely
        # matters) and the planner's space is model-independent
        return []

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        config = _text_config(model, self.token)
        layers = decoder_parts(model).layers
        total = len(layers)
        if self.num_layers >= total:
            raise RecipeError(
                f"{self.token} drops {self.num_layers} of the model's {total} decoder layers",
                f"drop from 1 to {total - 1} (drop-layers-1 to drop-layers-{total - 1})"
                if total > 1
                else "a model with one decoder layer has none to drop",
            )
        last = list(range(total - self.num_layers, total))  # what a prediction without values drops
        if has_values(model) or ctx.source is not None:
            influence = block_influence(model, ctx.calibration_for(self.token), ctx, self.token)
            dropped = sorted(value_or(torch.argsort(influence, stable=True)[: self.num_layers], last))
            scores = value_or(influence, [math.nan] * total)
            ctx.note(
                f"{self.token}: dropped decoder layers {dropped} of {total} (lowest block influence: "
                f"{', '.join(f'{scores[i]:.3g}' for i in dropped)})"
            )
        else:
            dropped = last
        kept = [i for i in range(total) if i not in dropped]
        for index in reversed(dropped):
            del layers[index]  # the ModuleList renumbers its keys: model.layers.0, 1, ...
        for index, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):  # the attention's KV-cache slot (and the layer's own)
                    module.layer_idx = index
        _keep_layers_in_config(config, kept)
        return model


def block_influence(model: nn.Module, calibration, ctx: Context, label: str = "block influence") -> torch.Tensor:
    """ShortGPT's block influence of every decoder layer, 1 - cos(input, output) per token
    averaged over ``calibration``, from one layer-by-layer pass: [num_layers]."""
    layers = decoder_parts(model).layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            sums[index] += (1 - cos).double().sum().cpu()
            counts[index] += cos.numel()

        return hook

    handles = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        calibrate_layers(model, calibration, lambda index, layer, inputs: None, ctx, f"{label}: measuring layers")
    finally:
        for handle in handles:
            handle.remove()
    return (sums / counts.clamp(min=1)).float()


def _keep_layers_in_config(config: PretrainedConfig, kept: list[int]) -> None:
    """Set ``num_hidden_layers`` and keep the kept layers' entries of every per-layer list
    (``layer_types``, SmolLM3's ``no_rope_layers``). Lists of layer *indices* (Qwen2-MoE's
    ``mlp_only_layers``) cannot be told apart from data and are left as they are."""
    total = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        # token id lists (eos_token_id) can have any length, so they are never per-layer
        if isinstance(value, list) and len(value) == total and "token" not in key:
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
