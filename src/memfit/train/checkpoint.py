"""Training checkpoints written in a background thread, atomically, and read back for ``--resume``.

A checkpoint is a directory ``checkpoints/step-N`` holding, per rank, the trainable weights and the
optimizer state as safetensors (``rank-R.safetensors``), and one ``state.json``: the step, losses so
far, learning-rate scheduler, RNG states, and a fingerprint of the run's settings. Nothing is
pickled: tensors go to safetensors and everything else to JSON, so reading a checkpoint runs no code.

Writing: the training thread copies what it must save to CPU (a snapshot; training then goes on
changing the originals), and a writer thread serializes it into ``.step-N.tmp`` and renames that to
``step-N`` once every rank's files are there. A directory named ``step-N`` is therefore complete;
a run killed while writing leaves only a ``.tmp`` directory, which resuming ignores and removes.
The snapshot is held until the write ends and released by the training thread (`poll`), so every
allocation and free stays on the thread the memory tracker watches. One write is in flight at a
time; the next waits for it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memfit.errors import CheckpointError

KEEP = 2  # complete checkpoints kept; older ones are removed after a newer one lands
STATE = "state.json"
# Test hook: the writer of this step stalls after writing its tensors, before the rename (the
# SIGKILL-while-writing test kills the run then).
STALL_ENV = "MEMFIT_TEST_STALL_CHECKPOINT"


# -- nested state <-> (tensors, JSON) -------------------------------------------------------------
def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """A JSON-able copy of ``obj`` with each tensor replaced by ``{"tensor": key}`` and stored in
    ``tensors`` (dicts keep non-string keys, tuples stay tuples)."""
    if isinstance(obj, torch.Tensor):
        local = getattr(obj, "_local_tensor", obj)  # an FSDP2 shard: this rank's part
        tensors[path] = local.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, flatten(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        if "tuple" in obj:
            return tuple(unflatten(v, tensors) for v in obj["tuple"])
        return {k: unflatten(v, tensors) for k, v in obj["dict"]}
    return obj


# -- what a checkpoint holds ----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """CPU copies of this rank's trainable weights (its shards, under FSDP), optimizer state and RNG
    states: ``(tensors, tree)`` for `Writer.save`."""
    tensors: dict[str, torch.Tensor] = {}
    weights = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tree = flatten({"weights": weights, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tensors)
    return tensors, tree


# -- writing ----------------------------------------------------------------------------------------
class Writer:
    """Writes checkpoints under ``root`` in a background thread (see the module docstring).

    Args:
        root: the ``checkpoints`` directory.
        rank, ranks: this process and how many write each checkpoint.
    """

    def __init__(self, root: Path, rank: int = 0, ranks: int = 1) -> None:
        self.root = root
        self.rank, self.ranks = rank, ranks
        self._thread: threading.Thread | None = None
        self._held: Any = None  # the snapshot being written, released by `poll`
        self._error: BaseException | None = None
        root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, tensors: dict[str, torch.Tensor], tree: Any, state: dict[str, Any]) -> None:
        """Start writing checkpoint ``step`` (waits for the previous write first)."""
        self.wait()
        self._held = (tensors, tree)
        self._thread = threading.Thread(
            target=self._write, args=(step, tensors, tree, state), name=f"memfit-checkpoint-{step}", daemon=True
        )
        self._thread.start()

    def poll(self) -> None:
        """Release a finished write's snapshot; raise its error, if it failed."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            self._held = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {error}", f"check that {self.root} is writable")

    def wait(self) -> None:
        """Block until the write in flight (if any) has landed."""
        if self._thread is not None:
            self._thread.join()
        self.poll()

    def _write(self, step: int, tensors: dict[str, torch.Tensor], tree: Any, state: dict[str, Any]) -> None:
        try:
            tmp = self.root / f".step-{step}.tmp"
            tmp.mkdir(exist_ok=True)
            save_file(tensors, str(tmp / f"rank-{self.rank}.safetensors"))
            _write_json(tmp / f"rank-{self.rank}.json", tree)
            if os.environ.get(STALL_ENV) == str(step):
                sys.stderr.write(f"memfit: stalled writing checkpoint {step}\n")
                sys.stderr.flush()
                time.sleep(3600)
            (tmp / f"rank-{self.rank}.done").touch()
            if self.rank != 0:
                return
            while len(list(tmp.glob("rank-*.done"))) < self.ranks:  # the other ranks' files
                time.sleep(0.01)
            _write_json(tmp / STATE, state)
            _fsync_dir(tmp)
            tmp.rename(self.root / f"step-{step}")
            _fsync_dir(self.root)
            for old in complete(self.root)[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:  # reported on the training thread by `poll`
            self._error = exc
        finally:
            del tensors, tree  # the training thread holds the snapshot until `poll` drops it


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------------------------------
def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def remove_partial(root: Path) -> None:
    """Remove what a run killed while writing left behind."""
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def read(path: Path, rank: int) -> tuple[dict[str, Any], Any]:
    """``(state, tree)`` of checkpoint ``path`` for ``rank``: the JSON state and the rank's
    weights and optimizer state (`unflatten`-ed).

    Raises:
        CheckpointError: a file is missing or corrupt.
    """
    try:
        state = json.loads((path / STATE).read_text())
        tree = json.loads((path / f"rank-{rank}.json").read_text())
        tensors = load_file(str(path / f"rank-{rank}.safetensors"))
        return state, unflatten(tree, tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable: {exc}", "remove it to resume from an older one"
        ) from None
