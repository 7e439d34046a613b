"""Streaming a checkpoint: build the model with empty weights, then read each part's tensors
from the safetensors files (memory-mapped) only when a calibrated method reaches it.

With a `CheckpointSource` in `Context.source`, `calibrate_layers` materializes decoder layer i
just before processing it and the strategy packs it right after, so at any moment the process
holds the packed layers so far, one float layer and the calibration activations, never the
whole float model.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from memfit.errors import CheckpointError, ModelNotFoundError


class CheckpointSource:
    """Tensors of a Hugging Face checkpoint directory, by name, read on demand.

    Args:
        directory: holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
        dtype: the dtype tensors are converted to as they are read (the model's).
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        self.dtype = dtype
        # id(meta parameter) -> (it, a weak reference to its real replacement), so a second module
        # holding the same meta parameter (a tie) gets the same real one, while packing a layer
        # still frees its float weights
        self._done: dict[int, tuple[nn.Parameter, weakref.ref]] = {}
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / "model.safetensors").is_file():
            path = self.directory / "model.safetensors"
            with safe_open(path, "pt") as f:
                self._files = dict.fromkeys(f.keys(), path)
        else:
            raise ModelNotFoundError(
                f"{str(self.directory)!r} has no model.safetensors", "stream only from safetensors checkpoints"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in its own memory (not a view of the mapped file), converted to
        ``dtype``: always one new tensor made from the stored one, so what a read holds does not
        depend on where the file placed it."""
        if name not in self._files:
            raise CheckpointError(f"{str(self.directory)!r} has no tensor {name!r}", "check the checkpoint")
        stored = self._stored(name)
        if self.dtype is not None and stored.is_floating_point() and stored.dtype != self.dtype:
            return stored.to(self.dtype)
        return stored.clone()

    def _stored(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], "pt") as f:
            return f.get_tensor(name)

    def fake(self) -> CheckpointSource:
        """This checkpoint as a prediction reads it: the same tensors, shapes and dtypes, made
        with ``torch.empty`` (fake tensors under `FakeTensorMode`), no data read."""
        return _FakeCheckpointSource(self.directory, self.dtype)

    def materialize(self, model: nn.Module, prefix: str = "", recurse: bool = True) -> None:
        """Give every parameter and buffer still on the meta device under ``prefix`` (a module
        fqn; all of them if empty; only the module's own with ``recurse=False``) its tensor from
        the checkpoint; a tied head gets the embedding's parameter itself."""
        root = model.get_submodule(prefix) if prefix else model
        for fqn, module in root.named_modules() if recurse else [("", root)]:
            full = f"{prefix}.{fqn}".strip(".")
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                real = self._done[id(param)][1]() if id(param) in self._done else None
                if real is None:
                    tied = self._tied_source(model, module, name)
                    real = tied if tied is not None else nn.Parameter(self.read(f"{full}.{name}"), requires_grad=False)
                    self._done[id(param)] = (param, weakref.ref(real))
                module._parameters[name] = real
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_meta and f"{full}.{name}" in self:
                    module._buffers[name] = self.read(f"{full}.{name}")

    def _tied_source(self, model: nn.Module, module: nn.Module, name: str) -> nn.Parameter | None:
        """The embedding's (real) weight if ``module.name`` is a head tied to it."""
        config = getattr(model, "config", None)
        if name != "weight" or not getattr(config, "tie_word_embeddings", False):
            return None
        head = getattr(model, "get_output_embeddings", lambda: None)()
        embedding = getattr(model, "get_input_embeddings", lambda: None)()
        if module is not head or embedding is None:
            return None
        if embedding.weight.is_meta:
            names = {id(m): n for n, m in model.named_modules()}
            self.materialize(model, names[id(embedding)])
        return embedding.weight

    def materialize_outside(self, model: nn.Module, prefix: str) -> None:
        """Materialize every module outside ``prefix`` (the decoder layers) except an untied
        output head, which nothing needs before the end."""
        head = getattr(model, "get_output_embeddings", lambda: None)()
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        for fqn, module in model.named_children():
            if fqn == prefix.split(".")[0] and "." in prefix:
                for child_fqn, _ in module.named_children():
                    if f"{fqn}.{child_fqn}" != prefix:
                        self.materialize(model, f"{fqn}.{child_fqn}")
                self.materialize(model, fqn, recurse=False)
            elif module is not head or tied:
                self.materialize(model, fqn)


# safetensors header dtype names
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _FakeCheckpointSource(CheckpointSource):
    """A `CheckpointSource` whose reads allocate what a real read would, without reading data."""

    def _stored(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], "pt") as f:
            stored = f.get_slice(name)
            shape, dtype = stored.get_shape(), stored.get_dtype()
        if dtype not in _DTYPES:
            raise CheckpointError(f"{name!r} in {str(self.directory)!r} has dtype {dtype}, unknown to memfit",
                                  "convert the checkpoint to float32, float16 or bfloat16")
        return torch.empty(shape, dtype=_DTYPES[dtype])
