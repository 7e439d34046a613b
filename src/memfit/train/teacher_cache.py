"""The teacher cache of `memfit distill --teacher-cache`: the teacher's top-K next-token
log-probabilities at every position of a run's windows, stored once and memory-mapped, so that
distillation trains without the teacher in memory.

A cache is tied to what produced it: the teacher's weight files (`teacher_identity`), the data's
token windows, ``seq``, the temperature and K; opening it with other ones, or reading a window it
does not cover, is refused. It is written to a temporary sibling directory and renamed, so an
interrupted build leaves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import CheckpointError, OutputError, RecipeError

CHUNK = 128  # positions whose logits are computed at once (distillation's chunked loss, and building a cache)

CACHE_VERSION = 1
CACHE_META = "teacher-cache.json"
CACHE_IDS, CACHE_VALUES = "ids.bin", "logprobs.bin"
CACHE_BATCH = 4  # windows the teacher runs at once while building a cache
DEFAULT_TOP_K = 64


@dataclasses.dataclass
class TeacherCache:
    """The teacher's top-K next-token log-probabilities at every position of the windows a run
    reads, stored once and memory-mapped while the student trains (the teacher is not loaded).

    Files: ``ids.bin`` [windows, seq, K] uint16 (int32 for vocabularies past 65,536 tokens),
    ``logprobs.bin`` [windows, seq, K] float16 (log-probabilities at the run's temperature; the rest
    of the mass is one minus their sum), and ``teacher-cache.json``: the teacher's identity, the
    data's fingerprint, the window length, K, the temperature, and the window indices covered. At
    K = 64 that is 256 bytes per token.
    """

    root: Path
    meta: dict[str, Any]
    ids: np.memmap
    values: np.memmap
    slots: dict[int, int]  # window index -> its place in the files

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def bytes_per_token(self) -> int:
        return self.top_k * (self.ids.dtype.itemsize + self.values.dtype.itemsize)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]

    def lookup(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, seq, K] int64, log-probabilities [B, seq, K] float32)`` of windows ``rows``.

        Raises:
            CheckpointError: a window the cache does not cover (it was built for another run).
        """
        missing = [r for r in rows if r not in self.slots]
        if missing:
            raise CheckpointError(f"teacher cache {str(self.root)!r} has no entry for training window {missing[0]} "
                                  "(it was built for a run with other steps, batch or seed)",
                                  "pass a new --teacher-cache directory")
        index = [self.slots[r] for r in rows]
        return (torch.from_numpy(self.ids[index].astype(np.int64)),
                torch.from_numpy(self.values[index].astype(np.float32)))

    @classmethod
    def open(cls, root: Path, expected: dict[str, Any]) -> TeacherCache:
        """The cache at ``root``, checked against what the run expects (``expected``: teacher,
        data, seq, temperature, vocab_size, and top_k unless None).

        Raises:
            CheckpointError: its files are missing, corrupt, or from another teacher, data or setting.
        """
        try:
            meta = json.loads((root / CACHE_META).read_text())
            shape = (len(meta["rows"]), meta["seq"], meta["top_k"])
            ids = np.memmap(root / CACHE_IDS, dtype=np.dtype(meta["ids_dtype"]), mode="r", shape=shape)
            values = np.memmap(root / CACHE_VALUES, dtype=np.float16, mode="r", shape=shape)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"teacher cache {str(root)!r} is unreadable ({type(exc).__name__}: {exc})",
                                  "remove it, or pass a new --teacher-cache directory") from None
        for key in ("teacher", "seq", "temperature", "top_k", "vocab_size", "data"):  # the plainest cause first
            if expected.get(key) is not None and meta.get(key) != expected[key]:
                what = {"teacher": "another teacher", "data": "other data", "seq": "another --seq",
                        "temperature": "another --temperature", "vocab_size": "another vocabulary",
                        "top_k": f"--top-k {meta.get(key)}"}[key]
                raise CheckpointError(f"teacher cache {str(root)!r} was built with {what}",
                                      "pass a new --teacher-cache directory (or the run's own settings)")
        return cls(root, meta, ids, values, {int(r): i for i, r in enumerate(meta["rows"])})

    @classmethod
    def build(cls, root: Path, teacher: nn.Module, windows, rows: list[int], expected: dict[str, Any],
              chunk: int = CHUNK, progress=None) -> TeacherCache:
        """Run ``teacher`` over windows ``rows`` and store its top-K log-probabilities at ``root``
        (written to a temporary sibling and renamed: an interrupted build leaves nothing)."""
        from memfit.io import atomic_dir

        top_k, temperature, vocab = expected["top_k"], expected["temperature"], expected["vocab_size"]
        ids_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
        seq = windows.windows.shape[1]
        body, head = teacher.base_model, teacher.get_output_embeddings()
        device = next(teacher.parameters()).device
        with atomic_dir(root) as tmp:
            ids = np.memmap(tmp / CACHE_IDS, dtype=ids_dtype, mode="w+", shape=(len(rows), seq, top_k))
            values = np.memmap(tmp / CACHE_VALUES, dtype=np.float16, mode="w+", shape=(len(rows), seq, top_k))
            with torch.no_grad():
                for first in range(0, len(rows), CACHE_BATCH):
                    batch = windows.windows[rows[first:first + CACHE_BATCH]].to(device)
                    hidden = body(input_ids=batch, use_cache=False).last_hidden_state.flatten(0, 1)
                    found_ids, found = [], []
                    for start in range(0, hidden.shape[0], chunk):
                        logits = head(hidden[start:start + chunk]).float() / temperature
                        top = F.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
                        found.append(top.values.clamp(min=torch.finfo(torch.float16).min))
                        found_ids.append(top.indices)
                    shape = (batch.shape[0], seq, top_k)
                    ids[first:first + batch.shape[0]] = torch.cat(found_ids).reshape(shape).cpu().numpy()
                    values[first:first + batch.shape[0]] = torch.cat(found).reshape(shape).cpu().numpy()
                    if progress is not None:
                        progress("teacher cache", min(first + CACHE_BATCH, len(rows)), len(rows))
            ids.flush()
            values.flush()
            del ids, values
            meta = {"version": CACHE_VERSION, **expected, "ids_dtype": np.dtype(ids_dtype).name,
                    "rows": [int(r) for r in rows]}
            (tmp / CACHE_META).write_text(json.dumps(meta))
        return cls.open(root, expected)


def teacher_identity(ref: str | Path) -> str:
    """A fingerprint of a model's weights without loading them: each weight file's size and its
    first and last MiB (tiny models, built from a seed, and hub ids: the reference itself)."""
    from memfit.errors import ModelNotFoundError
    from memfit.io import stored_tensors
    from memfit.models.refs import resolve_loadable

    resolved = resolve_loadable(ref)
    try:
        files = sorted({t.path for t in stored_tensors(ref).values()})
    except ModelNotFoundError:
        files = [resolved.path] if resolved.path is not None and resolved.path.is_file() else []
    digest = hashlib.sha256(resolved.kind.value.encode())
    if not files:
        digest.update(resolved.text.encode())
    for path in files:
        size = path.stat().st_size
        digest.update(str(size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


class ShapeOnlyCache:
    """A teacher cache of the right shapes for predictions: its lookups allocate what a
    `TeacherCache`'s do (int64 ids and float32 log-probabilities), with nothing stored."""

    def __init__(self, top_k: int, seq: int, vocab_size: int) -> None:
        self.meta = {"top_k": top_k, "vocab_size": vocab_size}
        self.top_k, self.seq = top_k, seq

    def lookup(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(rows), self.seq, self.top_k)
        return torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.float32)


def prepare_teacher_cache(root: str | Path, teacher: str | Path, *, data: str | None, seq: int, seed: int, steps: int,
                          batch: int, temperature: float, top_k: int | None, device: str | None = None,
                          progress=None) -> TeacherCache:
    """The teacher cache at ``root`` for this run: opened and checked if it is there, else built
    by running ``teacher`` once over the windows the run's ``steps`` read (the top ``top_k``,
    default `DEFAULT_TOP_K`).

    Raises:
        CheckpointError: the cache there is from another teacher, data or setting, or unreadable.
        OutputError: ``root`` holds something else.
        RecipeError: ``top_k`` below 1.
    """
    from memfit.io import load, load_tokenizer
    from memfit.train import distributed
    from memfit.train.data import training_windows

    if top_k is not None and top_k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {top_k}", f"pass e.g. --top-k {DEFAULT_TOP_K}")
    root = Path(root)
    windows = training_windows(load_tokenizer(str(teacher)), data, seq, seed)
    expected = {"teacher": teacher_identity(teacher), "data": windows.fingerprint, "seq": seq,
                "temperature": temperature, "top_k": top_k}
    if (root / CACHE_META).is_file():
        return TeacherCache.open(root, expected)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputError(f"--teacher-cache {str(root)!r} exists and is not a teacher cache",
                          "pass a new directory (it is built there) or an existing cache")
    if distributed.under_torchrun():
        raise CheckpointError(f"teacher cache {str(root)!r} is not built", "build it with one process first")
    rows = sorted({r for step in range(steps) for r in windows.rows(step, batch)})
    model, _ = load(str(teacher))
    model.requires_grad_(False)
    model.to(distributed.device_type(device))
    expected = {**expected, "top_k": top_k or DEFAULT_TOP_K, "vocab_size": model.config.vocab_size}
    return TeacherCache.build(root, model, windows, rows, expected, progress=progress)
