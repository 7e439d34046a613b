"""Saving and loading models, atomically: `save`, and `load` for every kind of reference.

`load(ref)` and `skeleton(ref)` read directories written by `save` here and hand every other
reference (`memfit.models.refs.resolve`) to `memfit.models`.

A saved model is a directory holding:
- ``model.safetensors``: every tensor of the state dict once (tied names are recorded, not
  duplicated); int4 weights in the portable plain nibble layout;
- ``config.json`` and the tokenizer files, as Hugging Face writes them;
- ``memfit.json``: the format version, the recipe (plan) and the tied names;
- any extra files (the planner's report).

When the recipe changes no module types (an empty plan, a precision cast, structured pruning that
shrinks shapes and writes them into ``config.json``), the state dict keys are the Hugging Face
names, so ``transformers.AutoModelForCausalLM.from_pretrained`` loads the directory directly.
Everything is written to a temporary sibling directory that is renamed into place at the end, so
a crash never leaves a half-written model that looks complete. Loading uses safetensors only:
nothing is unpickled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from memfit.errors import CheckpointError, ModelNotFoundError, OutputError, RecipeError
from memfit.memory.rss import trim_freed_memory
from memfit.models import tiny
from memfit.models.load import Loaded, load_pretrained
from memfit.models.meta import meta_model
from memfit.models.meta import skeleton as external_skeleton
from memfit.models.refs import Ref, RefKind, resolve, resolve_loadable
from memfit.plan import Plan, apply
from memfit.settings import RunSettings
from memfit.workload import Context

FORMAT_VERSION = 1
MANIFEST = "memfit.json"
WEIGHTS = "model.safetensors"


def load(ref: str | Path | Ref, *, tokenizer: bool = True) -> Loaded:
    """Load a model and its tokenizer.

    Args:
        ref: a memfit output directory, a Hugging Face directory or hub id, a ``.gguf`` file,
            ``"demo"``, ``"tiny-llama"`` or ``"tiny-qwen2"``.
        tokenizer: also load the tokenizer (else None is returned in its place; `load_tokenizer`
            loads it alone).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelNotFoundError: nothing matches ``ref``.
        CheckpointError: a memfit directory is incomplete or corrupt.

    Example:
        >>> model, tokenizer = memfit.load("demo")
    """
    resolved = resolve(ref)
    if resolved.kind is RefKind.SAVED:
        return load_saved(resolved.path, tokenizer)
    return load_pretrained(resolved, tokenizer)


def saved_settings(ref: str | Path | Ref) -> RunSettings:
    """The run settings a directory written by `save` recorded (the KV-cache format ``memfit optimize
    --mode generate`` chose), or the defaults for any other reference.

    Raises:
        ModelNotFoundError: nothing matches ``ref``.
        CheckpointError: a memfit directory's recipe is unreadable.
    """
    resolved = resolve(ref)
    return read_recipe(resolved.path)[1].settings if resolved.kind is RefKind.SAVED else RunSettings()


def load_tokenizer(ref: str | Path | Ref) -> PreTrainedTokenizerBase:
    """The tokenizer `load` would return for ``ref``, without the model.

    Raises:
        ModelNotFoundError: nothing matches ``ref``, or its tokenizer cannot be read.
    """
    resolved = resolve_loadable(ref)
    if resolved.kind is RefKind.TINY:
        return tiny.byte_tokenizer()
    try:
        if resolved.kind is RefKind.GGUF:
            return AutoTokenizer.from_pretrained(resolved.path.parent, gguf_file=resolved.path.name)
        if resolved.kind is RefKind.DEMO:
            from memfit.models.demo import demo_dir

            return AutoTokenizer.from_pretrained(demo_dir())
        return AutoTokenizer.from_pretrained(resolved.path if resolved.path is not None else resolved.text)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"cannot read the tokenizer of {resolved.text!r}: {first}",
                                 "pass a model directory that holds its tokenizer") from None


def rebuild_plan(plan: Plan) -> Plan:
    """What rebuilds a saved model's modules from its saved config: the recipe less the strategies
    that shrank the config (fewer layers, heads, channels: already in its shapes) and the
    training-only ones (optimizer, accumulation: nothing a loaded model holds)."""
    return Plan(tuple(s for s in plan.strategies if not (s.in_config or s.train_only)), plan.workload)


def skeleton(ref: str | Path | Ref) -> torch.nn.Module:
    """The model ``ref`` names, on the meta device: its modules, shapes, dtypes and ties, no weights.

    Only the config (and a memfit directory's recipe) is read, so this takes a second even for a
    70B model.

    Args:
        ref: anything `load` accepts, a ``config.json`` path, or a bundled config name
            (`memfit.models.refs.bundled_configs`: public architectures such as ``llama-3-70b``).
            Bundled configs and bare config files give fp32 parameters (a recipe such as ``bf16``
            changes that); a model directory gives the dtype `load` would, and a memfit
            directory its saved recipe applied.

    Raises:
        ModelNotFoundError: nothing matches ``ref``, or its config cannot be read.

    Example:
        >>> memfit.estimate(skeleton("llama-3-70b"), "bf16").weight_bytes
    """
    resolved = resolve(ref)
    if resolved.kind is RefKind.SAVED:
        _, plan, config = read_recipe(resolved.path)
        return apply(meta_model(config), rebuild_plan(plan), Context())
    return external_skeleton(resolved)


def save(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    extra_files: dict[str, str | bytes] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Save ``model`` (with the plan applied to it) and its tokenizer to ``out_dir``, atomically.

    Args:
        model: a model from `memfit.load`, after `memfit.apply` or not.
        tokenizer: its tokenizer.
        out_dir: the directory to create or replace. An existing directory is replaced only if it
            is empty or was written by memfit.
        extra_files: more files to write into the directory (name -> text or bytes).
        notes: what the strategies reported doing, recorded in ``memfit.json``.

    Returns:
        The output directory.

    Raises:
        OutputError: ``out_dir`` is a file or a non-empty directory memfit did not write.
    """
    out = Path(out_dir)
    check_output_dir(out)
    with atomic_dir(out) as tmp:
        tensors, tied = _unique_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        plan = getattr(model, "memfit_plan", None) or Plan()
        manifest = {"format_version": FORMAT_VERSION, "plan": plan.to_dict(), "tied": tied, "notes": notes or []}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return out


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a new hidden sibling directory of ``out`` to fill; when the block succeeds it replaces
    ``out`` in one rename, when it fails it is removed (``out`` is left as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _use_umask(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: Path, own: tuple[str, ...] = ()) -> None:
    """Raise `OutputError` unless ``out`` may be written: absent, empty, memfit's own (a saved
    model), or holding only files named in ``own`` (what the command writes there: its last run's)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} is a file", "choose a directory path for --out")
    if (out.is_dir() and not (out / MANIFEST).is_file()
            and any(entry.name not in own or not entry.is_file() for entry in out.iterdir())):
        raise OutputError(
            f"output directory {str(out)!r} is not empty and was not written by memfit",
            "choose a new or empty directory",
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename, so
    ``path`` is either its old self or complete; permissions follow the umask.

    Raises:
        OutputError: the directory cannot be written.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror}", "choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _use_umask(directory: Path) -> None:
    # mkdtemp creates 0700 and some writers 0600; give the output the permissions a plain
    # mkdir and open would have.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _unique_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each storage once; ``tied`` maps a dropped name to the kept one."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape))
        if key in owner:
            tied[name] = owner[key]
            continue
        owner[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied


def read_recipe(path: Path) -> tuple[dict, Plan, PretrainedConfig]:
    """The manifest, plan and config of a directory written by `save` (no tensors are read).

    Raises:
        CheckpointError: the manifest, recipe or config is missing or unreadable.
    """
    manifest = _read_manifest(path)
    try:
        return manifest, Plan.from_dict(manifest["plan"]), AutoConfig.from_pretrained(path)
    except (RecipeError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot read the recipe or config in {str(path)!r}: {exc}", "save the model again"
        ) from None


def load_saved(path: Path, tokenizer: bool = True):
    """Load a directory written by `save`: rebuild the modules from the recipe, then the tensors
    (and the tokenizer, unless ``tokenizer`` is False: None in its place).

    Raises:
        CheckpointError: a file is missing or corrupt, or the tensors do not match the recipe.
    """
    model = _load_saved_model(path)
    return model, AutoTokenizer.from_pretrained(path) if tokenizer else None


def _load_saved_model(path: Path, select=None) -> torch.nn.Module:
    manifest, plan, config = read_recipe(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} has no {WEIGHTS}", "the save did not finish; save the model again")
    # Parameters on the meta device, buffers (rotary frequencies) real: then the recipe rebuilds
    # the packed modules on meta, and the checkpoint's tensors are assigned in place.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    apply(model, rebuild_plan(plan), Context())
    model.memfit_plan = plan
    keep = select(model) if select is not None else None
    state = _read_tensors(weights, keep)
    state._metadata = _convert_saved(model, state)
    for alias, source in manifest.get("tied", {}).items():
        if source not in state and (keep is None or keep(source)):
            raise CheckpointError(f"{str(path)!r}: tied tensor {alias!r} points at missing {source!r}", "save again")
        if source in state:
            state[alias] = state[source]
    _assign(model, state, path, partial=keep is not None)
    _retie(model, manifest.get("tied", {}))
    return model.eval()


def _assign(model: torch.nn.Module, state: dict, path: Path, partial: bool) -> None:
    """Assign ``state`` to ``model``'s meta tensors; every one must get a tensor unless ``partial``."""
    try:
        result = model.load_state_dict(state, strict=not partial, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{str(path)!r} does not match its recipe: {first}", "save the model again") from None
    if partial:
        if result.unexpected_keys:
            raise CheckpointError(f"{str(path)!r} holds tensors the model does not have: {result.unexpected_keys[:3]}",
                                  "save the model again")
        return
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{str(path)!r} lacks tensors for {leftover[:3]}", "save the model again")


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file: ``offset`` is from the file's start."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def stored_tensors(ref: str | Path | Ref) -> dict[str, StoredTensor]:
    """Every tensor of a model directory's safetensors files (memfit's or Hugging Face's, or the
    demo), by state-dict name, without reading any data.

    Raises:
        ModelNotFoundError: ``ref`` is not a directory of safetensors files.
        CheckpointError: a file's header is corrupt.
    """
    found = {}
    for weights in _weight_files(ref):
        try:
            with open(weights, "rb", buffering=0) as raw:
                base, header = _read_header(raw)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _DTYPES.get(info["dtype"])
                start, end = info["data_offsets"]
                if dtype is None or end < start:
                    raise ValueError(f"tensor {name!r} has dtype {info['dtype']!r} or offsets {start}..{end}")
                found[name] = StoredTensor(weights, base + start, end - start, dtype, tuple(info["shape"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{str(weights)!r} is corrupt: {exc}", "save the model again") from None
    return found


def _weight_files(ref: str | Path | Ref) -> list[Path]:
    resolved = resolve(ref)
    if resolved.kind is RefKind.SAVED:
        return [resolved.path / WEIGHTS]
    if resolved.kind is RefKind.DEMO:
        from memfit.models.demo import demo_dir

        directory = Path(demo_dir())
    elif resolved.kind is RefKind.HF_DIR:
        directory = resolved.path
    else:
        raise ModelNotFoundError(f"{resolved.text!r} is not a model directory of safetensors files",
                                 "pass a directory written by memfit, a Hugging Face directory, or demo")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {str(index)!r}: {exc}", "download the model again") from None
        return [directory / shard for shard in shards]
    if not (directory / WEIGHTS).is_file():
        raise ModelNotFoundError(f"{str(directory)!r} has no {WEIGHTS}", "pass a directory of safetensors weights")
    return [directory / WEIGHTS]


def import_model_code(ref: str | Path | Ref) -> None:
    """Import the modeling code of ``ref``'s architecture (transformers imports it lazily, when the
    first model of a type is built), so a caller can take its memory baseline after it."""
    with contextlib.suppress(Exception):  # only a warm-up: loading reports any real problem
        config = AutoConfig.from_pretrained(_weight_files(ref)[0].parent)
        AutoModelForCausalLM._model_mapping[type(config)]


def load_partial(ref: str | Path | Ref, select) -> torch.nn.Module:
    """The model `load` returns, with only some of its tensors read: ``select(model)`` is called
    once the modules are built (on the meta device) and returns ``keep(name)``, which says which
    state-dict names to read; the others stay on the meta device (for a caller that supplies
    them, as streaming does).

    Raises:
        ModelNotFoundError: ``ref`` is not a directory of safetensors files.
        CheckpointError: a file is corrupt or does not match the model.
    """
    resolved = resolve(ref)
    if resolved.kind is RefKind.SAVED:
        return _load_saved_model(resolved.path, select)
    files = _weight_files(resolved)
    directory = files[0].parent
    stored = stored_tensors(resolved)
    floats = {t.dtype for t in stored.values() if t.dtype.is_floating_point}
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=floats.pop() if len(floats) == 1 else None)
    keep = select(model)
    state = collections.OrderedDict()
    for weights in files:
        state.update(_read_tensors(weights, keep))
    _assign(model, state, directory, partial=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and n in stored and keep(n)]
    if missing:
        raise CheckpointError(f"{str(directory)!r}: tensors {missing[:3]} were not assigned", "check the model files")
    return model.eval()


TRIM_EVERY = 4 << 20  # bytes converted between returns of the freed temporaries to the system


def _convert_saved(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Convert packed tensors whose kernel layout differs from the saved one, one module at a time.

    Each saved copy is freed as soon as its module's is made, and the conversion's freed
    temporaries are returned to the system every `TRIM_EVERY` bytes: glibc keeps such holes
    resident, and without both the load's peak was twice the packed bytes. Returns the
    ``load_state_dict`` metadata that says which modules are converted already.
    """
    metadata, converted = {}, 0
    for name, module in model.named_modules():
        if hasattr(module, "convert_saved"):
            metadata[name] = module.convert_saved(state, f"{name}.")
            converted += state[f"{name}.qweight"].nbytes if f"{name}.qweight" in state else 0
            if converted >= TRIM_EVERY:
                trim_freed_memory()
                converted = 0
    trim_freed_memory()
    return metadata


def _retie(model: torch.nn.Module, tied: dict[str, str]) -> None:
    # ``assign=True`` wraps each loaded tensor in a new Parameter; point tied names back at one
    # object so later in-place changes (casts, training) keep them shared.
    for alias, source in tied.items():
        alias_module, _, alias_leaf = alias.rpartition(".")
        source_module, _, source_leaf = source.rpartition(".")
        src = model.get_submodule(source_module)
        dst = model.get_submodule(alias_module)
        table = "_parameters" if source_leaf in src._parameters else "_buffers"
        getattr(dst, table)[alias_leaf] = getattr(src, table)[source_leaf]


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {MANIFEST} in {str(path)!r}: {exc}", "save the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has memfit format {manifest.get('format_version') if isinstance(manifest, dict) else '?'}, "
            f"this memfit reads {FORMAT_VERSION}",
            "save the model again with this memfit version",
        )
    return manifest


# safetensors' dtype names (https://github.com/huggingface/safetensors, the header format)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_tensors(weights: Path, keep=None) -> collections.OrderedDict[str, torch.Tensor]:
    """Every tensor of a safetensors file (those ``keep(name)`` accepts, if given), each read once
    from the file into its own allocation.

    Not through safetensors' memory map: mapped pages count in the process's memory while the
    copies are made (the peak was twice the file), and tensors at arbitrary file offsets can be
    misaligned for the packed CPU kernels' vector loads (a segfault in _weight_int8pack_mm). A
    fresh allocation is 64-byte aligned. safetensors still checks the header first.
    """
    try:
        with safe_open(str(weights), framework="pt") as f:  # validates the header and the offsets
            names = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
        with open(weights, "rb", buffering=0) as raw:
            base, header = _read_header(raw)
            return collections.OrderedDict((name, _read_one(raw, base, name, header[name])) for name in names
                                           if keep is None or keep(name))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{str(weights)!r} is corrupt: {exc}", "save the model again") from None


def _read_header(raw) -> tuple[int, dict]:
    """A safetensors file's header (from its start) and the offset its tensor data starts at."""
    size = int.from_bytes(raw.read(8), "little")
    return 8 + size, json.loads(raw.read(size))


def _read_one(raw, base: int, name: str, info: dict) -> torch.Tensor:
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has dtype {info['dtype']!r}, which memfit does not read")
    start, end = info["data_offsets"]
    tensor = torch.empty(info["shape"], dtype=dtype)
    if tensor.nbytes != end - start:
        raise ValueError(f"tensor {name!r} holds {end - start} bytes, its shape needs {tensor.nbytes}")
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    raw.seek(base + start)
    done = 0
    while done < len(view):
        got = raw.readinto(view[done:])
        if not got:
            raise ValueError(f"the file ends inside tensor {name!r}")
        done += got
    return tensor
