"""Where a causal LM keeps its parts: embedding, decoder layers, their attention and MLP Linears,
norms, output head.

This is the one place that knows layer names. `LAYOUTS` maps a Hugging Face ``model_type`` to its
`Layout` (a new architecture is a table row), and `decoder_parts` finds the decoder layers of the
Hugging Face decoder-only layout (``model.<base>.layers``, as Llama, Mistral, Qwen2, Gemma, Phi-3
and most others use). Calibrated methods, structured pruning, low-rank scopes and the GGUF writer
ask here instead of spelling ``q_proj`` themselves.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from memfit.errors import RecipeError


@dataclasses.dataclass(frozen=True)
class Layout:
    """Attribute names inside one decoder layer.

    Attributes:
        attention: the attention block (``self_attn``); ``q``, ``k``, ``v``, ``o`` its Linears.
        mlp: the MLP block (``mlp``); ``gate``, ``up``, ``down`` its Linears.
        input_norm: the norm before attention (it produces q/k/v's input).
        post_attention_norm: the norm before the MLP (it produces gate/up's input).
        rotary_pairs: llama.cpp's rotary for this architecture rotates adjacent pairs (llama) rather
            than halves (NEOX, qwen2), so its q/k rows are permuted when written to GGUF.
    """

    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    rotary_pairs: bool = True

    @property
    def attention_linears(self) -> tuple[str, str, str, str]:
        return (self.q, self.k, self.v, self.o)

    @property
    def mlp_linears(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)


LLAMA = Layout()
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": dataclasses.replace(LLAMA, rotary_pairs=False),
}
"""Layouts by Hugging Face ``model_type``; `layout_of` falls back to Llama's names."""


def layout_of(model: nn.Module | None) -> Layout:
    """The `Layout` of ``model`` (by its config's ``model_type``; Llama's names if unlisted)."""
    config = getattr(model, "config", None)
    return LAYOUTS.get(getattr(config, "model_type", None), LLAMA)


@dataclasses.dataclass
class DecoderParts:
    """The parts of a decoder-only model, by reference (changing them changes the model).

    Attributes:
        layers: the decoder layers, in order.
        layers_fqn: their container's name (``"model.layers"``).
    """

    layers: nn.ModuleList
    layers_fqn: str


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find ``model``'s decoder layers.

    Raises:
        RecipeError: the model does not have the decoder-only layout.
    """
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise RecipeError(
            f"{type(model).__name__} has no decoder layers at {prefix}.layers",
            "calibrated methods support decoder-only models; use a round-to-nearest recipe (int8, int4-g128)",
        )
    return DecoderParts(layers=layers, layers_fqn=f"{prefix}.layers")
