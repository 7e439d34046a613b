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

`measure` measures the three on this machine by running the runtime's decode with every layer
streamed (the placement that needs the least memory), read when reached and read ahead, warm or
from the disk: ``C`` is the warm step read when reached less its reads at the rate ``T`` threads
copy the file's bytes (`read_rate`, ``pread`` into buffers as the runtime reads), and ``R_T`` and
``R_1`` are the rates the runtime's reader achieved in those runs. A prediction for another
placement (more layers resident, another batch's compute measured the same way) is then the
formula at its own ``S``. `Rates.assumed` stands for a machine
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
from memfit.offload import READ_AHEAD, Placement, load_streamed
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


def read_rate(ranges: list[tuple[Path, int, int]], threads: int, *, rounds: int = ROUNDS) -> float:
    """Bytes/s at which ``threads`` threads copy ``ranges`` (``(file, offset, bytes)``) into memory,
    each into its own buffer, a `CHUNK` a call; the median of ``rounds`` passes after an untimed one
    (so from the page cache). A pass repeats the ranges up to `MIN_PASS_BYTES`, so starting threads
    does not dominate a small model's."""
    pieces = [(path, start, min(CHUNK, offset + size - start)) for path, offset, size in ranges
              for start in range(offset, offset + size, CHUNK)]
    pieces = pieces * max(1, -(-MIN_PASS_BYTES // max(sum(size for _, _, size in pieces), 1)))
    total = sum(size for _, _, size in pieces)
    files = {path: os.open(path, os.O_RDONLY) for path in {p for p, _, _ in pieces}}
    buffers = [bytearray(CHUNK) for _ in range(threads)]

    def work(index: int) -> None:
        view = memoryview(buffers[index])
        for path, start, size in pieces[index::threads]:
            os.preadv(files[path], [view[:size]], start)

    def one_pass() -> float:
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

    The runtime runs ``steps`` decode steps with every layer streamed (its smallest placement,
    whatever the budget), read when reached and read ahead; and the streamed bytes are read with
    ``T`` threads from the page cache (`read_rate`). The compute ``C`` is the warm step read when
    reached less those reads; the read rates are what the runtime's reader achieved, ``S`` over
    its step less ``C`` (read ahead from the disk, where reads overlap: ``S`` over the step). With
    ``cold``, the runs read around the page cache (``page_cache=False``: from the disk every token).
    """
    warm = _step_seconds(ref, batch, prompt_tokens, new_tokens, steps, ahead=0, page_cache=True)
    streamed_bytes, threads, ranges = warm[1], torch.get_num_threads(), warm[2]
    compute = max(warm[0] - streamed_bytes / read_rate(ranges, threads), 1e-6)
    sync = warm[0] if not cold else _step_seconds(ref, batch, prompt_tokens, new_tokens, steps, ahead=0,
                                                  page_cache=False)[0]
    ahead = _step_seconds(ref, batch, prompt_tokens, new_tokens, steps, ahead=READ_AHEAD, page_cache=not cold)[0]
    rate_t = streamed_bytes / max(sync - compute, 1e-9)
    rate_1 = streamed_bytes / (ahead if cold else max(ahead - compute, 1e-9))
    return Rates(compute_s=compute, read_threads=threads, read_bytes_per_s=rate_t, read_one_bytes_per_s=rate_1,
                 cores=len(os.sched_getaffinity(0)), batch=batch, context=prompt_tokens + new_tokens,
                 source="measured, cold" if cold else "measured", cold=cold)


def _step_seconds(ref, batch: int, prompt_tokens: int, new_tokens: int, steps: int, *, ahead: int,
                  page_cache: bool) -> tuple[float, int, list[tuple[Path, int, int]]]:
    """``(seconds per decode step, streamed bytes, their file ranges)`` of the runtime with every layer
    of ``ref`` streamed through the smallest ring (a run's ring is within a few MB of it when its
    budget goes to resident layers; a ring far past the caches is slower to compute from); the
    median of three passes after one that warms the step."""
    model, streamed, placement = load_streamed(ref, 1 << 62, batch=batch, prompt_tokens=prompt_tokens,
                                               new_tokens=max(new_tokens, steps + 1), ahead=ahead, count_rss=False,
                                               resident_layers=0, page_cache=page_cache, ring_bytes=0)
    units = [u for i in placement.streamed_layers for u in layer_units(model, i, stored_tensors(ref))]
    ranges = [(slot.stored.path, slot.stored.offset, slot.stored.nbytes) for u in units for slot in u.slots]
    engine = Engine(model, streamed=streamed, cache_step=1)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator).tolist()
    times = []
    for _ in range(4):
        tokens = engine.stream(prompts, steps + 1)
        next(tokens)  # the prefill's
        began = time.perf_counter()
        for _ in tokens:
            pass
        times.append((time.perf_counter() - began) / steps)
    streamed.close()
    return statistics.median(times[1:]), placement.streamed_bytes, ranges
