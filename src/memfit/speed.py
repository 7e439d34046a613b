"""The cost model: a placement's decode speed, predicted from measured rates.

A decode step of a placement that streams ``S`` bytes per token costs

- read when reached (the step's ``T`` threads read each unit together): ``C + S / R_T``;
- read ahead by a background thread while the step computes: ``max(C, S / R_1)`` when a core is
  left for the reader or the reads wait on the disk (cold), else ``C + S / R_1`` (copies from the
  page cache take a core the step's threads were using, so they add to the step rather than hide
  under it);

where ``C`` is the step's compute (the runtime's kernels reading every weight, resident or
streamed, from memory, and attending over the cache), ``R_T`` the rate at which ``T`` threads copy
the file's bytes into memory (from the page cache when it holds them, else from the disk) and
``R_1`` one thread's. Tokens/s is the batch over the step.

`measure` measures the three on this machine: ``R_1`` and ``R_T`` by reading the streamed layers'
byte ranges of the model's file with 1 and ``T`` threads, as the runtime reads them (``pread`` into
a buffer); ``C`` by running the runtime's decode with every layer streamed (the placement that
needs the least memory) and taking ``S / R_T`` off its step. `Rates.assumed` stands for a machine
memfit is not running on (a GPU a model is planned for): ``C`` as every weight byte read once at
the memory bandwidth (decode at small batches is bound by it) and the reads overlapped on a side
stream, ``max(C, S / R)``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from memfit.io import stored_tensors
from memfit.offload import Placement, load_streamed
from memfit.runtime import Engine
from memfit.runtime.streamed import layer_units

STEPS = 16  # decode steps timed for the compute
CHUNK = 4 << 20  # bytes a reading thread copies per call
ROUNDS = 3  # read passes timed (medians)
MIN_PASS_BYTES = 64 << 20  # a timed read pass repeats the ranges up to this many bytes


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a prediction is made from.

    Attributes:
        compute_s: the decode step's compute ``C`` at ``batch`` rows and ``context`` tokens (s).
        read_threads: ``T``, the threads the decode step reads with.
        read_bytes_per_s: ``R_T``; ``read_one_bytes_per_s``: ``R_1``.
        cores: cores the process may use (a core beyond ``T`` lets read-ahead overlap).
        batch, context: the workload the compute was measured (or assumed) at.
        source: ``"measured"`` or ``"assumed"``.
    """

    compute_s: float
    read_threads: int
    read_bytes_per_s: float
    read_one_bytes_per_s: float
    cores: int
    batch: int
    context: int
    source: str = "measured"
    overlapped: bool = False  # reads overlap compute on another engine (a GPU's copy engine)
    cold: bool = False  # reads come from the disk: a reader waits on it rather than copying, so it overlaps

    @classmethod
    def assumed(cls, weight_bytes: int, memory_bytes_per_s: float, read_bytes_per_s: float, *, batch: int = 1,
                context: int = 0) -> Rates:
        """Rates of a machine described by two bandwidths: the step reads ``weight_bytes`` once at
        ``memory_bytes_per_s``; streamed bytes arrive at ``read_bytes_per_s`` while it computes."""
        return cls(compute_s=weight_bytes / memory_bytes_per_s, read_threads=1, read_bytes_per_s=read_bytes_per_s,
                   read_one_bytes_per_s=read_bytes_per_s, cores=1, batch=batch, context=context, source="assumed",
                   overlapped=True)

    def step_s(self, streamed_bytes: int, read_ahead: bool) -> float:
        """Seconds of one decode step that streams ``streamed_bytes``."""
        if self.overlapped:
            return max(self.compute_s, streamed_bytes / self.read_bytes_per_s)
        if not read_ahead:
            return self.compute_s + streamed_bytes / self.read_bytes_per_s
        one = streamed_bytes / self.read_one_bytes_per_s
        spare = self.cores > self.read_threads or self.cold
        return max(self.compute_s, one) if spare else self.compute_s + one

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A placement's predicted decode: bytes and tokens/s (all rows together)."""

    resident_bytes: int
    streamed_bytes: int
    tokens_per_s: float  # the way the run reads (`Placement.read_ahead`)
    tokens_per_s_read_when_reached: float
    tokens_per_s_read_ahead: float
    rates: Rates

    def as_dict(self) -> dict:
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "rates"}, "rates": self.rates.as_dict()}


def predict(placement: Placement, rates: Rates) -> Prediction:
    """The decode speed of ``placement`` at ``rates``' batch."""
    sync = rates.batch / rates.step_s(placement.streamed_bytes, read_ahead=False)
    ahead = rates.batch / rates.step_s(placement.streamed_bytes, read_ahead=True)
    return Prediction(placement.resident_bytes, placement.streamed_bytes,
                      ahead if placement.read_ahead and placement.streamed_layers else sync, sync, ahead, rates)


def read_rate(ranges: list[tuple[Path, int, int]], threads: int, *, rounds: int = ROUNDS, cold: bool = False) -> float:
    """Bytes/s at which ``threads`` threads copy ``ranges`` (``(file, offset, bytes)``) into memory,
    each into its own buffer, a `CHUNK` a call; the median of ``rounds`` passes after an untimed one.
    ``cold``: the files are dropped from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``)
    before each pass, so the reads come from the disk."""
    pieces = [(path, start, min(CHUNK, offset + size - start)) for path, offset, size in ranges
              for start in range(offset, offset + size, CHUNK)]
    if not cold:  # warm passes of at least MIN_PASS_BYTES, so starting threads does not dominate a small model's
        pieces = pieces * max(1, -(-MIN_PASS_BYTES // max(sum(size for _, _, size in pieces), 1)))
    total = sum(size for _, _, size in pieces)
    files = {path: os.open(path, os.O_RDONLY) for path in {p for p, _, _ in pieces}}
    buffers = [bytearray(CHUNK) for _ in range(threads)]

    def work(index: int) -> None:
        view = memoryview(buffers[index])
        for path, start, size in pieces[index::threads]:
            os.preadv(files[path], [view[:size]], start)

    def one_pass() -> float:
        if cold:
            for fd in files.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        began = time.perf_counter()
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - began

    try:
        one_pass()
        return total / statistics.median(one_pass() for _ in range(rounds))
    finally:
        for fd in files.values():
            os.close(fd)


def measure(ref: str | Path, *, batch: int = 1, prompt_tokens: int, new_tokens: int,
            steps: int = STEPS, cold: bool = False) -> Rates:
    """`Rates` of this machine for ``ref`` at ``batch`` rows of ``prompt_tokens`` plus ``new_tokens``.

    Runs the runtime with every layer streamed (its smallest placement, whatever the budget) for
    ``steps`` decode steps, and reads the streamed bytes with 1 and ``T`` threads, from the page
    cache (warm) and, with ``cold``, also from the disk: the compute is the warm step less its
    warm reads, and the rates returned are the cold ones.
    """
    model, streamed, placement = load_streamed(ref, 1 << 62, batch=batch, prompt_tokens=prompt_tokens,
                                               new_tokens=max(new_tokens, steps + 1), ahead=0, count_rss=False,
                                               resident_layers=0)
    threads = torch.get_num_threads()
    units = [u for i in placement.streamed_layers for u in layer_units(model, i, stored_tensors(ref))]
    ranges = [(slot.stored.path, slot.stored.offset, slot.stored.nbytes) for u in units for slot in u.slots]
    engine = Engine(model, streamed=streamed, cache_step=1)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator).tolist()
    times = []
    for _ in range(2):  # the first pass warms the step and the page cache
        steps_iter = engine.stream(prompts, steps + 1)
        next(steps_iter)
        began = time.perf_counter()
        for _ in steps_iter:
            pass
        times.append((time.perf_counter() - began) / steps)
    rate_t, rate_1 = read_rate(ranges, threads), read_rate(ranges, 1)
    streamed_bytes = placement.streamed_bytes
    compute = max(times[-1] - streamed_bytes / rate_t, 0.0)
    if cold:
        rate_t, rate_1 = read_rate(ranges, threads, cold=True), read_rate(ranges, 1, cold=True)
    return Rates(compute_s=compute, read_threads=threads, read_bytes_per_s=rate_t, read_one_bytes_per_s=rate_1,
                 cores=len(os.sched_getaffinity(0)), batch=batch, context=prompt_tokens + new_tokens,
                 source="measured, cold" if cold else "measured", cold=cold)
