"""`evaluate()`: measured quality, bytes and speed of a model.

- perplexity: ``exp`` of the mean next-token loss over non-overlapping windows of 512 tokens
  (the first token of each window has no context and is not scored);
- weight bytes: storage of every parameter and buffer the model holds, shared storage once;
- peak RSS: the process's peak resident memory so far (``getrusage``);
- prefill tokens/s: a 512-token prompt to its first token through memfit's runtime, median of 3;
- decode tokens/s: 64 greedy decode steps of the runtime (its static KV cache; the native step,
  memfit's C library, where it runs the model, else the eager step, or the compiled one with
  ``compile=True``: what ``memfit generate`` runs) after a 32-token prompt, batch 1, median of 3
  after 8 untimed warm-up steps (the prompt's prefill is not timed).
For architectures the runtime does not run, both time transformers' forward instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from memfit.data import eval_text, token_windows
from memfit.generation import cached_step
from memfit.memory.report import weight_bytes
from memfit.memory.rss import lifetime_peak_rss_bytes as peak_rss_bytes
from memfit.runtime import Engine, runs_on_runtime
from memfit.runtime.kvcache import KVFormat
from memfit.workload import ProgressFn

DEFAULT_TOKENS = 16_384
WINDOW = 512
PREFILL_TOKENS = 512
PROMPT_TOKENS = 32
DECODE_TOKENS = 64
REPEATS = 3
WARMUP_STEPS = 8  # decode steps run once, untimed, before the timed runs


@dataclasses.dataclass(frozen=True)
class Metrics:
    """What `evaluate` measured. Keys match the CLI's JSON."""

    perplexity: float
    eval_tokens: int
    weight_bytes: int
    peak_rss_bytes: int
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    text: str | None = None,
    num_tokens: int = DEFAULT_TOKENS,
    window: int = WINDOW,
    measure_speed: bool = True,
    compile: bool = False,
    kv_cache: KVFormat | None = None,
    progress: ProgressFn | None = None,
) -> Metrics:
    """Measure perplexity, weight bytes, peak memory and prefill/decode speed.

    Args:
        model: a causal LM (from `memfit.load`, optimized or not).
        tokenizer: its tokenizer.
        text: text to score; the built-in evaluation text if None.
        num_tokens: tokens to score, in whole windows (default 16,384).
        window: tokens per window (default 512).
        measure_speed: also time prefill and decode (skip for quick quality checks).
        compile: where the native step does not run the model, time the runtime's compiled decode
            step (what ``memfit generate`` runs there) instead of its eager one; compiling costs
            tens of seconds per model on a CPU.
        kv_cache: score and time through the runtime with its KV cache quantized (`KVFormat`):
            perplexity by `runtime_perplexity`, so the stored cache is what is measured; the
            decode step is then the compiled or eager one (the native step does not quantize).
        progress: ``progress(description, done, total)`` callback.

    Returns:
        `Metrics`.

    Raises:
        DataError: the text is shorter than one window.
    """
    windows = token_windows(tokenizer, eval_text() if text is None else text, num_tokens, window)
    model.eval()
    if kv_cache is None:
        ppl = perplexity(model, windows, progress)
    else:
        engine = Engine(model, compile=False, native=False, cache_step=1, kv_format=kv_cache)
        ppl = runtime_perplexity(engine, windows, progress, chunk=window)
        del engine
    prefill = decode = None
    if measure_speed:
        prompt = windows[0]
        prefill = prefill_tokens_per_s(model, prompt[:PREFILL_TOKENS], kv_format=kv_cache)
        decode = decode_tokens_per_s(model, prompt[:PROMPT_TOKENS], DECODE_TOKENS, compile=compile,
                                     kv_format=kv_cache)
    return Metrics(
        perplexity=ppl,
        eval_tokens=windows.numel(),
        weight_bytes=weight_bytes(model),
        peak_rss_bytes=peak_rss_bytes(),
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=decode,
    )


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: ProgressFn | None = None) -> float:
    """``exp(mean next-token NLL)`` over windows [N, T], one window per forward."""
    device = _device_of(model)
    total_nll, total_count = 0.0, 0
    for i, ids in enumerate(windows):
        ids = ids.to(device)[None]  # [1, T]
        logits = model(ids, use_cache=False).logits  # [1, T, V]
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_count += ids.shape[1] - 1
        if progress:
            progress("perplexity", i + 1, len(windows))
    return math.exp(total_nll / total_count)


PERPLEXITY_CHUNK = 512  # tokens per forward of `runtime_perplexity` (their logits are [chunk, vocab] floats)


@torch.inference_mode()
def runtime_perplexity(engine: Engine, windows: torch.Tensor, progress: ProgressFn | None = None,
                       chunk: int = PERPLEXITY_CHUNK) -> float:
    """`perplexity` through memfit's runtime: each window [T] written into the engine's static KV
    cache ``chunk`` tokens at a time, every position's logits computed over the cache as stored, so
    a quantized cache (``kv-int8``/``kv-int4``) or streamed layers are what is measured."""
    total_nll, total_count = 0.0, 0
    for i, window in enumerate(windows):
        for loss, count in engine.losses(window.to(engine.decoder.device), chunk):
            total_nll += loss.item()
            total_count += count
        if progress:
            progress("perplexity", i + 1, len(windows))
    return math.exp(total_nll / total_count)


def prefill_tokens_per_s(model: nn.Module, ids: torch.Tensor, repeats: int = REPEATS, compile: bool = False,
                         kv_format: KVFormat | None = None) -> float:
    """Tokens/s from a prompt of ``ids`` [T] to its first token through the runtime (batch 1; its KV
    cache in ``kv_format``), median of ``repeats`` after one untimed run; transformers' forward for
    architectures the runtime does not run."""
    if not runs_on_runtime(model):
        return hf_prefill_tokens_per_s(model, ids, repeats)
    engine, prompt = Engine(model, compile=compile, kv_format=kv_format), ids.tolist()

    def first_token() -> None:
        next(iter(engine.stream([prompt], 1)))

    first_token()  # warm-up: allocates the cache (and compiles the step)
    return len(prompt) / statistics.median(_timed(first_token) for _ in range(repeats))


def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = REPEATS,
                        compile: bool = False, kv_format: KVFormat | None = None) -> float:
    """Tokens/s of ``new_tokens`` greedy decode steps after ``prompt`` [T] through the runtime (batch 1; its
    KV cache in ``kv_format``; the prefill is not timed), median of ``repeats`` after `WARMUP_STEPS`
    untimed steps; transformers' cached forward for architectures the runtime does not run."""
    if not runs_on_runtime(model):
        return hf_decode_tokens_per_s(model, prompt, new_tokens, repeats)
    engine, ids = Engine(model, compile=compile, kv_format=kv_format), prompt.tolist()
    rates = []
    for repeat in range(repeats + 1):  # the first run, of a few steps, warms up
        count = new_tokens if repeat else min(new_tokens, WARMUP_STEPS)
        steps = engine.stream([ids], count + 1)
        next(steps)  # the prefill's token
        elapsed = _timed(lambda steps=steps: sum(1 for _ in steps))
        if repeat:
            rates.append(count / elapsed)
    return statistics.median(rates)


@torch.inference_mode()
def hf_prefill_tokens_per_s(model: nn.Module, ids: torch.Tensor, repeats: int = REPEATS) -> float:
    """Tokens/s of transformers' forward over ``ids`` [T] (batch 1, no cache), median of ``repeats``."""
    ids = ids.to(_device_of(model))[None]
    model(ids[:, :8], use_cache=False)  # warm-up: first-call allocations and kernel selection
    times = [_timed(lambda: model(ids, use_cache=False)) for _ in range(repeats)]
    return ids.shape[1] / statistics.median(times)


@torch.inference_mode()
def hf_decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = REPEATS) -> float:
    """Tokens/s of ``new_tokens`` greedy single-token steps of transformers' forward with its dynamic
    cache, median of ``repeats`` (what memfit measured before its runtime)."""
    prompt = prompt.to(_device_of(model))[None]  # [1, T]
    rates = []
    for repeat in range(repeats + 1):  # the first run, of a few steps, warms up
        cache, token = cached_step(model, prompt, None)  # token: [1, 1]

        def steps(count: int) -> None:
            nonlocal cache, token
            for _ in range(count):
                cache, token = cached_step(model, token, cache)

        count = new_tokens if repeat else min(new_tokens, WARMUP_STEPS)
        elapsed = _timed(functools.partial(steps, count))
        if repeat:
            rates.append(new_tokens / elapsed)
    return statistics.median(rates)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers())
    return tensor.device
