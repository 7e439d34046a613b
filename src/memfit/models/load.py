"""`load(ref)`: the only place that knows where models come from.

A reference is one of:
- a directory saved by `memfit.save` (it holds ``memfit.json``): the recipe is re-applied to an
  empty model and the packed tensors are loaded into it;
- a local Hugging Face model directory, or a hub id (for users with a hub);
- a ``.gguf`` file (dequantized through transformers' GGUF loader);
- ``demo`` (SmolLM2-135M-Instruct, see `memfit.models.demo`);
- a tiny random model: ``tiny-llama`` or ``tiny-qwen2``.

`skeleton(ref)` builds the same model on the meta device (modules, shapes, dtypes, no weights)
from its config alone, which also accepts a ``config.json`` path or the name of a bundled config
(`bundled_configs`: public architectures such as ``llama-3-70b``); `memfit.estimate` runs on it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from memfit.errors import ModelNotFoundError
from memfit.models import tiny

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]
CONFIG_DIR = Path(__file__).parent / "configs"


def load(ref: str | Path) -> Loaded:
    """Load a model and its tokenizer.

    Args:
        ref: a memfit output directory, a Hugging Face directory or hub id, a ``.gguf`` file,
            ``"demo"``, ``"tiny-llama"`` or ``"tiny-qwen2"``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelNotFoundError: nothing matches ``ref``.
        CheckpointError: a memfit directory is incomplete or corrupt.

    Example:
        >>> model, tokenizer = memfit.load("demo")
    """
    text = str(ref)
    if text in tiny.CONFIGS:
        return tiny.tiny_model(text)
    if text == "demo":
        from memfit.models.demo import demo_dir

        return _from_hf(demo_dir())
    check_ref(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "memfit.json").is_file():
            from memfit.io import load_saved

            return load_saved(path)
        return _from_hf(path)
    if path.is_file():
        return load_gguf(path)
    return _from_hub(text)


def check_ref(ref: str | Path) -> None:
    """Raise `ModelNotFoundError` if ``ref`` cannot name a model (without loading anything).

    A directory, a ``.gguf`` file, a bundled name or a string shaped like a hub id passes.
    """
    text = str(ref)
    if text in tiny.CONFIGS or text == "demo":
        return
    path = Path(text).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return
    if path.exists():
        raise ModelNotFoundError(f"{text!r} is a file but not a .gguf", "pass a model directory or a .gguf file")
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return
    raise ModelNotFoundError(
        f"model {text!r} not found: no such directory or file",
        f"pass a Hugging Face directory, a .gguf file, a hub id, 'demo', or one of {', '.join(tiny.CONFIGS)}",
    )


def _from_hf(path: Path | str) -> Loaded:
    if not (Path(path) / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json", "pass a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _from_hub(hub_id: str) -> Loaded:
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype="auto")
        return model.eval(), AutoTokenizer.from_pretrained(hub_id)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {hub_id!r} is not a local path and could not be fetched from the hub: {first}",
            "check the id and your network, or pass a local directory",
        ) from None


def load_gguf(path: Path) -> Loaded:
    """Dequantize a GGUF file into an fp32 transformers model (needs the ``gguf`` package)."""
    kwargs = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelNotFoundError(
            f"cannot read GGUF file {str(path)!r}: {str(exc).splitlines()[0]}",
            "check that the file is complete and its architecture is supported by transformers",
        ) from None
    _forget_gguf_origin(model)
    return model.eval(), tokenizer


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    # The weights are plain fp32 now; transformers would otherwise treat the model as quantized
    # (refusing .float(), writing a gguf quantization_config into saved configs).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False


def bundled_configs() -> list[str]:
    """Names of the configs memfit ships (public shapes, no weights), e.g. ``llama-3-70b``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def skeleton(ref: str | Path) -> PreTrainedModel:
    """The model ``ref`` names, on the meta device: its modules, shapes, dtypes and ties, no weights.

    Only the config is read, so this takes a second even for a 70B model.

    Args:
        ref: anything `load` accepts, a ``config.json`` path, or a bundled config name
            (see `bundled_configs`). Bundled configs and bare config files give fp32 parameters
            (a recipe such as ``bf16`` changes that); a model directory gives the dtype `load`
            would, and a memfit directory its saved recipe applied.

    Raises:
        ModelNotFoundError: nothing matches ``ref``, or its config cannot be read.

    Example:
        >>> memfit.estimate(skeleton("llama-3-70b"), "bf16").weight_bytes
    """
    text = str(ref)
    if text in tiny.CONFIGS:
        from memfit.memory.estimate import meta_copy

        return meta_copy(tiny.tiny_model(text)[0])
    if text.lower() in bundled_configs():
        return _meta_model(_read_config(CONFIG_DIR / f"{text.lower()}.json"))
    if text == "demo":
        from memfit.models.demo import demo_dir

        return _meta_model(_read_config(demo_dir() / "config.json"), dtype="auto")
    path = Path(text).expanduser()
    if path.is_dir() and (path / "memfit.json").is_file():
        from memfit.io import read_recipe
        from memfit.plan import Context, apply

        _, plan, config = read_recipe(path)
        return apply(_meta_model(config), plan, Context())
    if path.is_dir() and (path / "config.json").is_file():
        return _meta_model(_read_config(path / "config.json"), dtype="auto")
    if path.is_file() and path.suffix == ".json":
        return _meta_model(_read_config(path))
    if path.is_file() and path.suffix == ".gguf":
        from memfit.memory.estimate import meta_copy

        return meta_copy(load_gguf(path)[0])
    raise ModelNotFoundError(
        f"model or config {text!r} not found",
        f"pass a model directory, a config.json, a .gguf file, 'demo', or a bundled config: "
        f"{', '.join(bundled_configs())}",
    )


def _read_config(path: Path) -> PretrainedConfig:
    try:
        data = json.loads(path.read_text())
        model_type = data["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(
            f"cannot read a model config from {str(path)!r}: {type(exc).__name__}: {exc}",
            "pass a Hugging Face config.json (it needs a 'model_type')",
        ) from None
    if model_type not in CONFIG_MAPPING:
        raise ModelNotFoundError(
            f"{str(path)!r} has model_type {model_type!r}, which this transformers does not know",
            "upgrade transformers or pass a supported architecture",
        )
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return CONFIG_MAPPING[model_type].from_dict(data)


def _meta_model(config: PretrainedConfig, dtype: str | torch.dtype = torch.float32) -> PreTrainedModel:
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ModelNotFoundError(
            f"cannot build a {config.model_type!r} model from its config: {str(exc).splitlines()[0]}",
            "check the config's fields",
        ) from None
    return model.eval()


def load_lazy(ref: str | Path):
    """``(model, tokenizer, source)`` with the weights still on the meta device, to be read from
    the checkpoint part by part (`memfit.calibration.stream.CheckpointSource`); None when ``ref``
    is not a safetensors model directory (or ``demo``), which `load` then reads whole.

    The model matches what `load` returns once every part is read: same modules, dtypes, ties.
    """
    from accelerate import init_empty_weights

    from memfit.calibration.stream import CheckpointSource

    text = str(ref)
    if text == "demo":
        from memfit.models.demo import demo_dir

        path = demo_dir()
    else:
        path = Path(text).expanduser()
        if not (path.is_dir() and (path / "config.json").is_file()) or (path / "memfit.json").is_file():
            return None
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return None
    config = _read_config(path / "config.json")
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):  # rotary frequencies are computed, not stored
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, CheckpointSource(path, dtype)
