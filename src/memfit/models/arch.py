"""Where a causal LM keeps its parts: embedding, decoder layers, final norm, output head.

Calibrated methods (GPTQ, activation-aware scaling) work decoder layer by decoder layer; this is
the one place that knows how to find the layers. It covers the Hugging Face decoder-only layout
(``model.<base>.layers``, as Llama, Mistral, Qwen2, Gemma, Phi-3 and most others use).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from memfit.errors import RecipeError


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
