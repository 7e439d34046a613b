"""Generation steps shared by evaluation (decode speed) and the memory workloads."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def cached_step(model: nn.Module, ids: torch.Tensor, cache):
    """One forward with the KV cache (a new one if ``cache`` is None); returns (cache, greedy
    next token [B, 1]). Only the last position's logits are computed, as generation needs.

    transformers 5.x names the cache ``cache``; 4.x names it ``past_key_values``.
    """
    keyword, keep_last = _forward_keywords(type(model))
    kwargs = {keyword: cache} if cache is not None else {}
    if keep_last:
        kwargs["logits_to_keep"] = 1
    out = model(ids, use_cache=True, **kwargs)
    new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return new_cache, out.logits[:, -1:].argmax(-1)


@functools.cache
def _forward_keywords(model_type: type) -> tuple[str, bool]:
    parameters = inspect.signature(model_type.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters
