"""GGUF files (llama.cpp's format) as transformers models, dequantized to fp32."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memfit.errors import ModelNotFoundError


def load_gguf(path: Path, tokenizer: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Dequantize a GGUF file into an fp32 transformers model (needs the ``gguf`` package), and its
    tokenizer (None with ``tokenizer=False``).

    Raises:
        ModelNotFoundError: the file is incomplete or its architecture is not supported.
    """
    kwargs = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        loaded = AutoTokenizer.from_pretrained(path.parent, **kwargs) if tokenizer else None
    except (ValueError, OSError, KeyError) as exc:
        raise ModelNotFoundError(
            f"cannot read GGUF file {str(path)!r}: {str(exc).splitlines()[0]}",
            "check that the file is complete and its architecture is supported by transformers",
        ) from None
    _forget_gguf_origin(model)
    return model.eval(), loaded


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    # The weights are plain fp32 now; transformers would otherwise treat the model as quantized
    # (refusing .float(), writing a gguf quantization_config into saved configs).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
