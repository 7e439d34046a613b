"""Running a `Workload` under the tracker, on real tensors (`profile`) or fake ones (`estimate`).

The same function runs both, so a prediction is a measurement of the same code on fake tensors.
Synthetic inputs are random token ids with no padding, one sequence per row.

Workloads:
- ``infer``: one forward of [batch_size, seq_len] tokens without the KV cache, no gradients;
- ``generate``: a forward of the prompt [batch_size, seq_len] into a static KV cache with room
  for prompt + new tokens (counted as ``kv_cache``), then ``new_tokens`` single-token steps, each
  computing the last position's logits only, no gradients;
- ``train``: two steps (forward, backward, optimizer step, zero grad), so the second step runs
  with the optimizer state already allocated: the steady state. A step runs the plan's
  micro-batches (``grad-accum-N``) of batch / ranks / N sequences each: one rank's share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.generation import cached_step
from memfit.memory.report import MemoryReport
from memfit.memory.tracker import PARAMETERS, Tracker, track
from memfit.runtime import Engine, runs_on_runtime
from memfit.runtime.engine import CACHE_STEP
from memfit.runtime.kvcache import KVFormat
from memfit.settings import RunSettings
from memfit.workload import Mode, Workload

TRAIN_STEPS = 2
TIMELINE_POINTS = 400


def profile(
    model: nn.Module,
    workload: Workload,
    settings: RunSettings | None = None,
    *,
    decode_steps: int | None = None,
    micro_batches: int | None = None,
    wrapped: nn.Module | None = None,
    loss_fn=None,
) -> MemoryReport:
    """Measure ``workload`` on ``model``: every allocation, tracked (see `memfit.memory.track`).

    ``decode_steps`` runs only that many of a generation's single-token steps (the cache is still
    sized for all of them). With a static cache every step allocates the same shapes, so the peak
    is the same; `memfit.estimate` runs two. ``micro_batches`` likewise runs only that many of a
    training step's micro-batches: the first creates the gradients and every later one adds into
    them in place, so from the second on each allocates the same bytes in the same order.

    ``settings``: how the workload runs (`memfit.plan.Plan.run`: optimizer, micro-batches,
    autocast); default AdamW in one micro-batch. Training uses a learning rate of 0, so the
    weights are left as they were; the memory is the same as with any other rate.

    ``wrapped``: the module to call instead of ``model`` (a ``DistributedDataParallel`` around it).

    ``loss_fn``: a training step's objective ``(model, ids, rows) -> loss`` instead of the model's
    next-token loss (`memfit.train.distill.Distiller`); its ``tensors()``, if it has them (a
    teacher's weights), are held as parameters for the whole run, as `memfit.train` holds them.

    Returns:
        A `MemoryReport` of the peak, with the top 20 modules and a timeline of about
        `TIMELINE_POINTS` samples.
    """
    was_training = model.training
    model.train(workload.mode is Mode.TRAIN)
    settings = settings or RunSettings()
    optimizer = settings.build_optimizer(model) if workload.mode is Mode.TRAIN else None
    try:
        with track(model, optimizer) as tracker:
            if hasattr(loss_fn, "tensors"):
                tracker.hold(loss_fn.tensors(), PARAMETERS)
            run_workload(model, workload, tracker, optimizer, settings, decode_steps=decode_steps,
                         micro_batches=micro_batches, wrapped=wrapped, loss_fn=loss_fn)
    finally:
        model.train(was_training)
    return tracker.report(top=20, timeline_points=TIMELINE_POINTS)


def run_workload(
    model: nn.Module,
    workload: Workload,
    tracker: Tracker,
    optimizer=None,
    settings: RunSettings | None = None,
    decode_steps: int | None = None,
    micro_batches: int | None = None,
    wrapped: nn.Module | None = None,
    loss_fn=None,
) -> None:
    """Run ``workload`` on ``model`` while ``tracker`` is active (the caller enters it); ``loss_fn``:
    see `profile`."""
    settings = settings or RunSettings()
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    if workload.mode is Mode.TRAIN:
        micro, count = settings.split(workload)
        ids = torch.randint(0, vocab, (micro, workload.seq_len), device=device)
        for _ in range(TRAIN_STEPS):
            for _ in range(count if micro_batches is None else min(count, micro_batches)):
                with settings.forward(device.type):
                    trained = wrapped or model
                    loss = (trained(ids, labels=ids, use_cache=False).loss if loss_fn is None
                            else loss_fn(trained, ids, list(range(micro)))) / count
                loss.backward()
                del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return
    ids = torch.randint(0, vocab, (workload.batch_size, workload.seq_len), device=device)
    if workload.mode is Mode.INFER:
        with torch.no_grad(), settings.forward(device.type):
            model(ids, use_cache=False)
    elif workload.mode is Mode.GENERATE:
        steps = workload.new_tokens if decode_steps is None else min(decode_steps, workload.new_tokens)
        if runs_on_runtime(model):
            with torch.no_grad(), settings.forward(device.type):
                _generate_with_runtime(model, ids, workload, tracker, steps, kv_format=settings.kv_cache)
            return
        if settings.kv_cache is not None:
            raise RecipeError(f"{settings.kv_cache.token} quantizes memfit runtime's cache, which does not run "
                              f"model type {getattr(model.config, 'model_type', None)!r}",
                              f"leave {settings.kv_cache.token} out for this model")
        with torch.no_grad(), settings.forward(device.type):
            cache = kv_cache(model, workload)
            _, token = cached_step(model, ids, cache)
            # allocated during the prompt; the report counts it from its allocation. Keys and
            # values only: the cache's position counters are bookkeeping.
            layers = getattr(cache, "layers", None)
            tracker.hold([(layer.keys, layer.values) for layer in layers] if layers else cache)
            for _ in range(steps):
                _, token = cached_step(model, token, cache)


def runtime_generate_report(model: nn.Module, workload: Workload, *, cache_step: int = CACHE_STEP,
                            decode_steps: int = 2, kv_format: KVFormat | None = None) -> MemoryReport:
    """The tracked report of the runtime's generate on ``model`` (real or fake tensors), its cache
    length rounded up to a multiple of ``cache_step`` (1: exactly the prompt plus new tokens, as a
    streamed run sizes it)."""
    ids = torch.randint(0, model.config.vocab_size, (workload.batch_size, workload.seq_len))
    with track(model) as tracker, torch.no_grad():
        _generate_with_runtime(model, ids, workload, tracker, min(decode_steps, workload.new_tokens), cache_step,
                               kv_format)
    return tracker.report()


def runtime_perplexity_report(model: nn.Module, window: int, chunk: int,
                              kv_format: KVFormat | None = None) -> MemoryReport:
    """The tracked report of `memfit.evaluate.runtime_perplexity` on ``model`` (real or fake
    tensors): a cache of ``window`` columns, then the window's first two chunks of ``chunk`` tokens
    (the others allocate the same)."""
    engine = Engine(model, compile=False, native=False, cache_step=1, kv_format=kv_format)
    ids = torch.randint(0, model.config.vocab_size, (window,))
    with track(model) as tracker, torch.no_grad():
        tracker.hold(engine.cache_for(1, window).tensors())
        for i, (loss, _) in enumerate(engine.losses(ids, chunk)):
            del loss
            if i == 1:
                break
    return tracker.report()


def _generate_with_runtime(model: nn.Module, ids: torch.Tensor, workload: Workload, tracker: Tracker,
                           steps: int, cache_step: int = CACHE_STEP, kv_format: KVFormat | None = None) -> None:
    """What `memfit generate` runs (its native step where it runs the model, else its eager one;
    with ``kv_format``, its quantized cache on the eager step, whose dequantized layer the compiled
    step's fused kernels may not hold, so the prediction is an upper bound there): the engine's
    workspace, its static cache (rounded up as the engine rounds it), the
    prefill, then ``steps`` decode steps."""
    engine = Engine(model, compile=False, cache_step=cache_step, kv_format=kv_format)
    cache = engine.cache_for(workload.batch_size, workload.seq_len + max(workload.new_tokens, 1))
    tracker.hold(cache.tensors())
    pad = torch.zeros(workload.batch_size, dtype=torch.long, device=ids.device)
    for _ in engine.tokens(ids, pad, cache, steps + 1):
        pass


def kv_cache(model: nn.Module, workload: Workload):
    """A static KV cache with room for ``workload``'s prompt plus new tokens.

    Each layer's keys and values are allocated at full length on first use (in the dtypes the
    layer produces them in) and written in place afterwards: no growth by concatenation, which
    would briefly hold a layer's keys twice. Once the prompt has run, ``kv_cache`` is
    2 x layers x kv_heads x head_dim x (prompt + new tokens) x batch x bytes per element.
    """
    from transformers import StaticCache

    config = model.config.get_text_config(decoder=True)
    return StaticCache(config=config, max_cache_len=workload.seq_len + workload.new_tokens)


@contextlib.contextmanager
def synthetic_input_facts() -> Iterator[None]:
    """Let transformers take, on fake tensors, the branches its real run takes on our inputs.

    transformers reads tensor values to decide whether a causal mask can be skipped (no padding)
    and whether sequences are packed; on fake tensors it cannot, so it materializes a [B, 1, T, T]
    mask a real run never builds. Our synthetic inputs have no padding and one sequence per row,
    so the answers are known from shapes: give transformers the values it would read (no padding
    mask; a cache offset of 0 for the prompt) and let it decide. Tests compare fake and real
    reports, so a transformers change here shows up.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers always installed
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor

    skip_mask = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    find_packed = getattr(masking_utils, "find_packed_sequence_indices", None)

    def fake_skip_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        # No padding: the mask is all ones, the same as no mask. A query of several tokens comes
        # only with an empty cache (the prompt): offset 0.
        if isinstance(padding_mask, FakeTensor):
            padding_mask = None
        if isinstance(q_offset, FakeTensor):
            q_offset = 0 if q_length > 1 else 1
        return skip_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    def fake_find_packed(position_ids):
        return None if isinstance(position_ids, FakeTensor) else find_packed(position_ids)

    patches = {"_ignore_causal_mask_sdpa": fake_skip_mask, "find_packed_sequence_indices": fake_find_packed}
    originals = {name: getattr(masking_utils, name) for name in patches if hasattr(masking_utils, name)}
    for name in originals:
        setattr(masking_utils, name, patches[name])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(masking_utils, name, original)
