"""Replacing a model's layers with quantized modules, one layer at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from memfit.strategies.quantize.grids import quantize_int8_rows
from memfit.strategies.quantize.packed import Int8Embedding, Int8Linear

if TYPE_CHECKING:
    from memfit.strategies.targets import Targets
    from memfit.workload import Context


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``fqn`` of ``model``."""
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def packed_rows(
    linear: nn.Linear, cls: type[Int8Linear] = Int8Linear, rounding: Callable = quantize_int8_rows
) -> Int8Linear:
    """``linear`` as ``cls`` (int8 per row by default; any per-row format, such as float8) with its
    bias kept."""
    bias = None if linear.bias is None else linear.bias.detach()
    return cls(*rounding(linear.weight), bias)


def quantize_model_(
    model: nn.Module,
    ctx: Context,
    targets: Targets,
    quantize_linear: Callable[[str, nn.Linear], nn.Module],
    label: str,
    head_class: type[Int8Linear] = Int8Linear,
) -> nn.Module:
    """Replace targeted Linear layers with ``quantize_linear(fqn, layer)``, one at a time so only
    one layer's float temporaries exist at once, then the embedding and head (`pack_embeddings_`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head and targets.matches(fqn)
    ]
    for done, fqn in enumerate(linears):
        set_submodule(model, fqn, quantize_linear(fqn, model.get_submodule(fqn)))
        ctx.report(f"{label}: layers", done + 1, len(linears) + 1)
    pack_embeddings_(model, targets, head_class)
    ctx.report(f"{label}: layers", len(linears) + 1, len(linears) + 1)
    return model


def pack_embeddings_(
    model: nn.Module, targets: Targets, head_class: type[Int8Linear] = Int8Linear, *, loaded_only: bool = False
) -> None:
    """Round the token embedding to an `Int8Embedding` and the output head to ``head_class`` (int8
    per row), if targeted and still in float. A tied head shares the embedding's packed tensors.
    With ``loaded_only``, a module whose weight is not read yet (meta, streamed) is left for later."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if get_in else None
    head = get_out() if get_out else None
    names = {id(m): fqn for fqn, m in model.named_modules()}
    emb_fqn, head_fqn = names.get(id(embedding)), names.get(id(head))
    do_embedding = isinstance(embedding, nn.Embedding) and targets.matches(emb_fqn)
    do_head = isinstance(head, nn.Linear) and targets.matches(head_fqn)
    tied = do_embedding and do_head and head.weight is embedding.weight
    if loaded_only:
        do_embedding = do_embedding and not embedding.weight.is_meta
        do_head = do_head and not head.weight.is_meta
    if do_embedding:
        q, scale = quantize_int8_rows(embedding.weight)
        new_embedding = Int8Embedding(q, scale, embedding.weight.dtype, embedding.padding_idx)
        set_submodule(model, emb_fqn, new_embedding)
        if tied:  # one copy of the packed table serves both
            set_submodule(model, head_fqn, head_class(q, scale, head.bias))
    if do_head and not tied:
        set_submodule(model, head_fqn, packed_rows(head, head_class))
