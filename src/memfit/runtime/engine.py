"""`Engine`: prefill and decode over a static KV cache, the decode step compiled, tokens streamed.

The single-token decode step is compiled with ``torch.compile`` (inductor; on CUDA with CUDA
graphs, inductor's ``triton.cudagraphs``): every step has the same shapes (the whole static cache is
attended, with a mask), so it compiles once per batch size and cache length. Cache lengths are
rounded up to a multiple of `CACHE_STEP`, so prompts of similar length share a compiled step.
Inductor caches what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``), so a second process with the same model and shapes skips code
generation and the C++ compiler; it still traces the step (a few seconds). If compiling fails,
the engine says so once on stderr and runs the same step eagerly.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import types
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.runtime.decoder import Decoder
from memfit.runtime.kvcache import KVCache, KVFormat
from memfit.runtime.native_step import NativeStep
from memfit.runtime.sampling import GREEDY, Sampler, Sampling
from memfit.runtime.streamed import StreamedWeights

CACHE_STEP = 256  # cache lengths are rounded up to a multiple of this
GREEDY_CHUNK = 8  # greedy native decoding: tokens per call of the C library (a 40 ms burst at 200 tokens/s)


def _step(decoder: Decoder, ids: torch.Tensor, columns: torch.Tensor, pad: torch.Tensor, cache: KVCache):
    return decoder.forward(ids, columns, pad, cache)


def cache_length(tokens: int, context_length: int, step: int = CACHE_STEP) -> int:
    """The cache length the engine allocates for ``tokens`` (prompt plus new): rounded up to a
    multiple of ``step``, but not past the model's context unless ``tokens`` is."""
    return min(-(-tokens // step) * step, max(tokens, context_length))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {device type: compiled step}


def compiled_step(model: nn.Module, device_type: str):
    """The decode step compiled for ``model`` on ``device_type`` (engines of one model share its graphs).

    Guards on the model's modules and parameters are left out (``skip_guard_on_all_nn_modules_unsafe``):
    checking them on every call cost 2 ms per token of the demo model, 14% of a compiled int4 step.
    That is safe because each model gets its own copy of the step's code object, and dynamo keeps
    compiled graphs per code object: a graph is only ever called with the model it was traced on.
    """
    steps = _COMPILED.setdefault(model, {})
    if device_type not in steps:
        code = _step.__code__.replace(co_name=f"_step_{id(model):x}")
        fresh = types.FunctionType(code, _step.__globals__, code.co_name)
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if device_type == "cuda":
            options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
        steps[device_type] = torch.compile(fresh, dynamic=False, fullgraph=True, options=options)
    return steps[device_type]


def _release(modules: list[nn.Module]) -> None:
    for module in modules:
        module.release_runtime()


@dataclasses.dataclass
class Step:
    """One decode step's new token per row (None for rows that had already stopped)."""

    tokens: list[int | None]


class Engine:
    """Generation for one model: a `Decoder`, its caches, and the compiled step.

    Args:
        model: a decoder-only causal LM (any format memfit saves).
        compile: compile the decode step where the native step does not run the model (default:
            yes); False runs it eagerly there.
        native: decode with `NativeStep` (one call of memfit's C library per token) where it runs
            the model (default: yes).
        streamed: the model's streamed layers (`memfit.offload.load_streamed`); their
            weights are read as each forward reaches them. The PyTorch step then runs eagerly.
        cache_step: cache lengths are rounded up to a multiple of this (default `CACHE_STEP`;
            1 sizes the cache to the prompt plus new tokens exactly).
        kv_format: quantize the KV cache (`KVFormat`: ``kv-int8``, ``kv-int4``); the decode step is
            then the compiled one (the native step keeps its cache in the model's dtype).
    """

    def __init__(self, model: nn.Module, *, compile: bool = True, native: bool = True,
                 streamed: StreamedWeights | None = None, cache_step: int = CACHE_STEP,
                 kv_format: KVFormat | None = None) -> None:
        model.eval()
        self.decoder = Decoder(model, streamed, kv_format)
        self.cache_step = cache_step
        if streamed is not None:
            compile = False  # the streamed forward acquires units through ctypes: no graph to compile
        self.native_step = NativeStep.create(self.decoder) if native else None
        # operands the packed kernels would otherwise recompute every step, held while the engine
        # lives (the native step reads the weights as they are)
        prepared = [] if self.native_step else [m for m in model.modules() if hasattr(m, "prepare_for_runtime")]
        self.workspace_bytes = sum(m.prepare_for_runtime() for m in prepared)
        weakref.finalize(self, _release, prepared)
        self.step_kind = "native" if self.native_step else "compiled" if compile else "eager"  # the last generation's
        self.compiled = False  # whether the last generation's decode steps ran compiled
        self.compile_seconds = 0.0  # time the first compiled step took (tracing and compiling)
        self._failed = not compile
        self._cache: KVCache | None = None
        self._warm: tuple[int, int] | None = None  # the (batch, cache length) the step last ran for

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static cache the engine holds (0 before its first generation)."""
        return self._cache.nbytes if self._cache is not None else 0

    @property
    def context_length(self) -> int:
        config = self.decoder.config
        return int(getattr(config, "max_position_embeddings", 0) or 1 << 20)

    def cache_for(self, batch: int, length: int) -> KVCache:
        """The engine's cache, reallocated only when ``batch`` or the rounded ``length`` changes."""
        max_len = cache_length(length, self.context_length, self.cache_step)
        cache = self._cache
        if cache is None or cache.batch != batch or cache.max_len != max_len:
            self._cache = None  # free the old one first
            cache = self._cache = self.decoder.new_cache(batch, max_len)
        return cache

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        eos: Sequence[int] = (),
    ) -> Iterator[Step]:
        """Yield each step's new tokens for prompts of token ids (left-padded into one batch).

        A row stops at an EOS id (which is yielded) or after ``max_new_tokens``; the iterator
        ends when every row has stopped. The first step is the prefill's.

        Raises:
            RecipeError: an empty prompt, ``max_new_tokens < 1``, or a prompt as long as the context.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RecipeError("the prompt is empty", "give at least one token of prompt")
        if max_new_tokens < 1:
            raise RecipeError(f"max new tokens must be at least 1 (got {max_new_tokens})", "pass a positive count")
        longest = max(len(p) for p in prompts)
        if longest >= self.context_length:
            raise RecipeError(
                f"the prompt has {longest} tokens; the model's context is {self.context_length}",
                "shorten the prompt",
            )
        max_new_tokens = min(max_new_tokens, self.context_length - longest)
        device = self.decoder.device
        cache = self.cache_for(len(prompts), longest + max_new_tokens)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        pad = torch.tensor([longest - len(p) for p in prompts], device=device)
        step = self._decode_fn()
        if step is not self.native_step and self._warm != (cache.batch, cache.max_len):
            # compile (or load) the step before the first token's clock stops: a dummy step at column 0,
            # which the prefill overwrites, with inputs strided as the decode steps' (a view of the
            # prompt would compile a second graph)
            step(self.decoder, torch.zeros(len(prompts), dtype=torch.long, device=device)[:, None],
                 torch.zeros(1, dtype=torch.long, device=device), pad, cache)
            self._warm = (cache.batch, cache.max_len)
        done = [False] * len(prompts)
        eos = set(eos)
        for produced, token in enumerate(self.tokens(ids.to(device), pad, cache, max_new_tokens, sampling, step)):
            values = token.tolist()
            yield Step([None if d else v for d, v in zip(done, values, strict=True)])
            done = [d or v in eos for d, v in zip(done, values, strict=True)]
            if all(done) or produced + 1 == max_new_tokens:
                return

    def tokens(
        self,
        ids: torch.Tensor,
        pad: torch.Tensor,
        cache: KVCache,
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        step=None,
    ) -> Iterator[torch.Tensor]:
        """Each step's sampled tokens [B] for left-padded ``ids`` [B, T] (the first is the prefill's).

        The loop `stream` runs, without reading any value: it runs on fake tensors too, so
        `memfit.estimate` predicts the runtime's memory by running this. ``step``: the decode step
        (default: eager). Stopping early is the caller's: close the iterator.
        """
        decoder, device = self.decoder, self.decoder.device
        step = step or self._native() or _step
        longest = ids.shape[1]
        sampler = Sampler(sampling, device)
        seen = None
        if sampling.repetition_penalty != 1.0:
            real = torch.arange(longest, device=device)[None] >= pad[:, None]  # left padding is not seen
            counts = torch.zeros(ids.shape[0], decoder.vocab_size, dtype=torch.long, device=device)
            seen = counts.scatter_add_(1, ids, real.long()) > 0
        logits = decoder.forward(ids, torch.arange(longest, device=device), pad, cache)
        if step is self.native_step and sampling.greedy and seen is None:
            yield from self._greedy_native(sampler(logits), longest, pad, cache, max_new_tokens)
            return
        for produced in range(max_new_tokens):
            token = sampler(logits, seen)  # [B]
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            yield token
            if produced + 1 < max_new_tokens:
                column = torch.arange(longest + produced, longest + produced + 1, device=device)
                logits = step(decoder, token[:, None], column, pad, cache)

    def logits(self, ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Every position's logits of one window ``ids`` [T] through the cache, ``chunk`` tokens a
        forward: per chunk, ``(its first position, logits [chunk, vocab])``, computed over the cache
        as stored (a quantized cache, streamed layers). Reads no value, so the estimator runs it on
        fake tensors too."""
        decoder = self.decoder
        length = ids.shape[0]
        cache = self.cache_for(1, length)
        pad = torch.zeros(1, dtype=torch.long, device=decoder.device)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            columns = torch.arange(start, end, device=decoder.device)
            yield start, decoder.forward(ids[None, start:end], columns, pad, cache, last_only=False)[0]

    def losses(self, ids: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, int]]:
        """Next-token losses of one window ``ids`` [T] through the cache (`logits`): per chunk,
        ``(summed NLL as a 0-d float tensor, tokens scored)``."""
        for start, logits in self.logits(ids, chunk):
            targets = ids[start + 1:start + 1 + logits.shape[0]]  # the window's last position has none
            loss = torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="sum")
            del logits
            yield loss, len(targets)

    def _greedy_native(self, token: torch.Tensor, longest: int, pad: torch.Tensor, cache: KVCache,
                       max_new_tokens: int) -> Iterator[torch.Tensor]:
        """`tokens`' loop for greedy decoding with the native step: the library takes several steps
        per call (their argmax too), so Python runs once per `GREEDY_CHUNK` tokens, not per token.
        Tokens still come one at a time; a caller that stops early leaves at most a chunk's extra
        columns in the cache, which the next generation's mask never reads."""
        yield token
        produced = 1
        while produced < max_new_tokens:
            count = min(GREEDY_CHUNK, max_new_tokens - produced)
            chunk = self.native_step.greedy(token, longest + produced - 1, pad, cache, count)  # [count, B]
            yield from chunk
            token = chunk[-1]
            produced += count

    def _native(self) -> NativeStep | None:
        # the native step runs the model's own dtypes; under autocast the eager step runs
        autocast = torch.is_autocast_enabled(self.decoder.device.type)
        return self.native_step if self.native_step is not None and not autocast else None

    def _decode_fn(self):
        if self._native() is not None:
            self.compiled, self.step_kind = False, "native"
            return self.native_step
        if self._failed:
            self.compiled, self.step_kind = False, "eager"
            return _step
        self.step_kind = "compiled"
        compiled = compiled_step(self.decoder.model, self.decoder.device.type)

        def run(*args):
            if self._failed:
                return _step(*args)
            began = time.perf_counter()
            try:
                out = compiled(*args)
            except Exception as exc:  # the compiler's failures are many kinds; eager always works
                self._failed, self.compiled, self.step_kind = True, False, "eager"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                sys.stderr.write(f"memfit: compiling the decode step failed ({type(exc).__name__}: {first}); "
                                 "decoding eagerly\n")
                return _step(*args)
            if not self.compiled:
                self.compiled, self.compile_seconds = True, time.perf_counter() - began
            return out

        return run
