"""Loading models from external sources: Hugging Face directories and hub ids, GGUF files, the demo
model and tiny random models.

`memfit.load` (in `memfit.io`) adds directories written by memfit on top of these. What a
reference names is decided in one place, `memfit.models.refs.resolve`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memfit.errors import ModelNotFoundError
from memfit.models import tiny
from memfit.models.meta import config_dtype, read_config
from memfit.models.refs import Ref, RefKind, resolve_loadable

log = logging.getLogger(__name__)

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def load_pretrained(ref: str | Path | Ref, tokenizer: bool = True) -> Loaded:
    """Load an external model and its tokenizer, the model in eval mode.

    Args:
        ref: a Hugging Face directory or hub id, a ``.gguf`` file, ``"demo"``, ``"tiny-llama"``
            or ``"tiny-qwen2"`` (a memfit directory is `memfit.io.load`'s).
        tokenizer: also load the tokenizer (else None is returned in its place).

    Raises:
        ModelNotFoundError: nothing matches ``ref``, or it cannot be read.
    """
    resolved = resolve_loadable(ref)
    kind = resolved.kind
    if kind is RefKind.TINY:
        model, tiny_tokenizer = tiny.tiny_model(resolved.text)
        return model, tiny_tokenizer if tokenizer else None
    if kind is RefKind.DEMO:
        from memfit.models.demo import demo_dir

        return _from_hf(demo_dir(), tokenizer)
    if kind is RefKind.HF_DIR:
        return _from_hf(resolved.path, tokenizer)
    if kind is RefKind.GGUF:
        from memfit.models.gguf import load_gguf

        return load_gguf(resolved.path, tokenizer)
    if kind is RefKind.HUB:
        return _from_hub(resolved.text, tokenizer)
    raise ModelNotFoundError(f"{resolved.text!r} is a memfit directory", "load it with memfit.load")


def _from_hf(path: Path | str, tokenizer: bool = True) -> Loaded:
    if not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json", "pass a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model.eval(), AutoTokenizer.from_pretrained(path) if tokenizer else None


def _from_hub(hub_id: str, tokenizer: bool = True) -> Loaded:
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype="auto")
        return model.eval(), AutoTokenizer.from_pretrained(hub_id) if tokenizer else None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {hub_id!r} is not a local path and could not be fetched from the hub: {first}",
            "check the id and your network, or pass a local directory",
        ) from None


def load_lazy(ref: str | Path | Ref):
    """``(model, tokenizer, source)`` with the weights still on the meta device, to be read from
    the checkpoint part by part (`memfit.models.stream.CheckpointSource`); None when ``ref``
    is not a safetensors model directory (or ``demo``), which `load` then reads whole.

    The model matches what `load` returns once every part is read: same modules, dtypes, ties.
    """
    from accelerate import init_empty_weights

    from memfit.models.stream import CheckpointSource

    resolved = resolve_loadable(ref)
    if resolved.kind is RefKind.DEMO:
        from memfit.models.demo import demo_dir

        path = demo_dir()
    elif resolved.kind is RefKind.HF_DIR:
        path = resolved.path
    else:
        return None
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return None
    config = read_config(path / "config.json")
    with init_empty_weights(include_buffers=False):  # rotary frequencies are computed, not stored
        model = AutoModelForCausalLM.from_config(config, dtype=config_dtype(config))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, CheckpointSource(path, config_dtype(config))
