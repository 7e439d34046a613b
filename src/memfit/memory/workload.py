"""Running a `Workload` under the tracker, on real tensors (`profile`) or fake ones (`estimate`).

The same function runs both, so a prediction is a measurement of the same code on fake tensors.
Synthetic inputs are random token ids with no padding, one sequence per row.

Workloads:
- ``infer``: one forward of [batch_size, seq_len] tokens without the KV cache, no gradients;
- ``generate``: a forward of the prompt [batch_size, seq_len] with the KV cache, then
  ``new_tokens`` single-token steps, no gradients; the cache is counted as ``kv_cache``;
- ``train``: two steps (forward, backward, optimizer step, zero grad), so the second step runs
  with the optimizer state already allocated: the steady state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from memfit.memory.report import MemoryReport
from memfit.memory.tracker import Tracker, track
from memfit.plan import Mode, Workload

TRAIN_STEPS = 2


def make_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """The optimizer a training workload uses: ``adamw`` or ``sgd`` (with momentum).

    The learning rate is 0, so profiling a training step leaves the weights as they were; the
    memory is the same as with any other rate. ``foreach=False``: the per-parameter loop, whose
    temporaries are one parameter's size (the foreach path's depend on grouping heuristics).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9, foreach=False)
    return torch.optim.AdamW(params, lr=0.0, foreach=False)


def profile(model: nn.Module, workload: Workload, optimizer: str = "adamw") -> MemoryReport:
    """Measure ``workload`` on ``model``: every allocation, tracked (see `memfit.memory.track`).

    Returns:
        A `MemoryReport` (top 20 modules) of the peak.
    """
    was_training = model.training
    model.train(workload.mode is Mode.TRAIN)
    opt = make_optimizer(model, optimizer) if workload.mode is Mode.TRAIN else None
    try:
        with track(model, opt) as tracker:
            run_workload(model, workload, tracker, opt)
    finally:
        model.train(was_training)
    return tracker.report(top=20)


def run_workload(model: nn.Module, workload: Workload, tracker: Tracker, optimizer=None) -> None:
    """Run ``workload`` on ``model`` while ``tracker`` is active (the caller enters it)."""
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (workload.batch_size, workload.seq_len), device=device)
    if workload.mode is Mode.INFER:
        with torch.no_grad():
            model(ids, use_cache=False)
    elif workload.mode is Mode.GENERATE:
        with torch.no_grad():
            cache, token = _step(model, ids, None, tracker)
            for _ in range(workload.new_tokens):
                cache, token = _step(model, token, cache, tracker)
    else:
        for _ in range(TRAIN_STEPS):
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _step(model: nn.Module, ids: torch.Tensor, cache, tracker: Tracker):
    from memfit.evaluate import _cache_keyword

    kwargs = {} if cache is None else {_cache_keyword(type(model)): cache}
    out = model(ids, use_cache=True, **kwargs)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    tracker.hold(cache)
    token = out.logits[:, -1:].argmax(-1)  # [B, 1]
    return cache, token


@contextlib.contextmanager
def synthetic_input_facts() -> Iterator[None]:
    """Let transformers take, on fake tensors, the branches its real run takes on our inputs.

    transformers reads tensor values to decide whether a causal mask can be skipped (no padding)
    and whether sequences are packed; on fake tensors it cannot, so it materializes a [B, 1, T, T]
    mask a real run never builds. Our synthetic inputs have no padding and one sequence per row,
    so the answers are known from shapes: answer them for fake tensors, defer to transformers for
    real ones. Tests compare fake and real reports, so a transformers change here shows up.
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
        if isinstance(padding_mask, FakeTensor):
            if local_attention_size is not None and kv_length >= local_attention_size:
                return False
            return q_length == 1 or kv_length == q_length
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
