"""Models on the meta device: modules, shapes, dtypes and ties, no data.

`meta_copy` maps a loaded model's tensors to meta; `skeleton` builds an external source's model
from its config alone (a second even for a 70B model). The estimator applies plans to these.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from memfit.errors import ModelNotFoundError
from memfit.models import tiny
from memfit.models.refs import Ref, RefKind, resolve


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device: same modules, shapes, dtypes
    and sharing (a tied weight stays one tensor), no data. Costs no tensor memory."""
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter
        ) else meta
    return copy.deepcopy(model, memo)


def to_fake(model: nn.Module, mode: FakeTensorMode, device: torch.device) -> None:
    """Replace every meta tensor of ``model`` by a fake tensor on ``device`` (ties kept), so
    operators dispatch as they would on that device."""
    converter = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in memo:
                    fake = converter.from_meta_and_device(mode, tensor.to("meta"), device)
                    is_param = isinstance(tensor, nn.Parameter)
                    memo[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_param else fake
                table[name] = memo[id(tensor)]


def skeleton(ref: str | Path | Ref) -> PreTrainedModel:
    """The model an external reference names, on the meta device, from its config alone.

    Args:
        ref: a tiny model, ``demo``, a Hugging Face directory, a ``.gguf`` file, a ``config.json``
            path or a bundled config name. Bundled configs and bare config files give fp32
            parameters (a recipe such as ``bf16`` changes that); a model directory gives the
            dtype loading would. A directory written by memfit is `memfit.io.skeleton`'s.

    Raises:
        ModelNotFoundError: nothing matches ``ref``, or its config cannot be read.
    """
    resolved = resolve(ref)
    kind = resolved.kind
    if kind is RefKind.TINY:
        return meta_copy(tiny.tiny_model(resolved.text)[0])
    if kind in (RefKind.BUNDLED, RefKind.CONFIG_FILE):
        return meta_model(read_config(resolved.path))
    if kind is RefKind.DEMO:
        from memfit.models.demo import demo_dir

        return meta_model(read_config(demo_dir() / "config.json"), dtype="auto")
    if kind is RefKind.HF_DIR:
        return meta_model(read_config(resolved.path / "config.json"), dtype="auto")
    if kind is RefKind.GGUF:
        from memfit.models.gguf import load_gguf

        return meta_copy(load_gguf(resolved.path)[0])
    raise ModelNotFoundError(
        f"model or config {resolved.text!r} cannot be built without downloading it",
        "pass a local model directory, a config.json, a .gguf file, 'demo', or a bundled config",
    )


def read_config(path: Path) -> PretrainedConfig:
    """A transformers config from a ``config.json``.

    Raises:
        ModelNotFoundError: the file is unreadable, has no ``model_type``, or names one this
            transformers does not know.
    """
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


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype ``config`` declares (fp32 if none)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def meta_model(config: PretrainedConfig, dtype: str | torch.dtype = torch.float32) -> PreTrainedModel:
    """``config``'s causal LM on the meta device, in ``dtype`` (``"auto"``: the config's).

    Raises:
        ModelNotFoundError: the config's fields do not build a model.
    """
    if dtype == "auto":
        dtype = config_dtype(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ModelNotFoundError(
            f"cannot build a {config.model_type!r} model from its config: {str(exc).splitlines()[0]}",
            "check the config's fields",
        ) from None
    return model.eval()
