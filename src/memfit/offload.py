"""Models larger than memory: `load_streamed` keeps what fits resident and streams the rest.

`load_streamed(ref, max_memory, ...)` decides a `Placement` (which decoder layers stay resident,
which are streamed, how large a ring buffer they stream through), reads only the resident
tensors, and returns the model with its `memfit.runtime.streamed.StreamedWeights`. The
embedding, the output head, the final norm and as many whole layers as fit stay resident; every
weight is read once per token, so each resident byte is a byte not read again, whichever layer
it belongs to.

The budget counts everything the run holds: the resident weights, the ring, the KV cache (sized
to the prompt plus new tokens exactly, not rounded), the prefill's and decode step's activations
and workspace, predicted by running the runtime's generate on fake tensors (as `memfit.estimate`
does), and what building the model's modules added to the process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from memfit.errors import BudgetError
from memfit.io import StoredTensor, load_partial, stored_tensors
from memfit.models.arch import decoder_parts
from memfit.runtime.kvcache import KVFormat
from memfit.runtime.streamed import ALIGN, StreamedWeights, aligned, layer_units, ring_minimum
from memfit.units import format_bytes

# left out of the ring: what a caller's generation loop holds beyond the predicted run (its prompt
# and token tensors, a few hundred bytes on the demo model)
SLACK = 64 << 10
READ_AHEAD = 64  # units the background reader may read ahead of the step
CACHED = 0.9  # above this fraction of the streamed bytes in the page cache, no background reader
CONTEXT_PROBE = 256  # tokens added to the second prediction that gives the workspace's growth per token


@dataclasses.dataclass
class Placement:
    """Where a streamed model's bytes are.

    Attributes:
        resident_layers, streamed_layers: decoder layer indices.
        resident_bytes: weights held (embedding, head, norms, resident layers).
        streamed_bytes: bytes read from the file per forward (per token in decode).
        ring_bytes: the buffer streamed layers are read into.
        workspace_bytes: the predicted peak of everything else (KV cache, activations,
            workspace) plus what the model's modules added to the process.
        budget_bytes: the budget it was made for.
        files: the safetensors files streamed from.
    """

    resident_layers: list[int]
    streamed_layers: list[int]
    resident_bytes: int
    streamed_bytes: int
    ring_bytes: int
    workspace_bytes: int
    budget_bytes: int
    files: list[str]
    read_ahead: bool = True  # whether a background reader reads ahead (else the step's threads read)
    cached_fraction: float = -1.0  # of the streamed bytes in the page cache when it was decided (-1: not asked)
    context_tokens: int = 0  # the longest prompt + new tokens this placement's budget holds (0: not predicted)
    batch: int = 1
    kv_cache: str = "model dtype"  # the KV cache's format

    @property
    def predicted_peak_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes + self.workspace_bytes

    def describe(self) -> str:
        if not self.streamed_layers:
            return f"every layer resident ({format_bytes(self.resident_bytes)}); nothing streamed" + self._context()
        resident = _ranges(self.resident_layers)
        return (f"resident: embedding, head, norms{' and layers ' + resident if resident else ''} "
                f"({format_bytes(self.resident_bytes)}); streamed: layers {_ranges(self.streamed_layers)} "
                f"({format_bytes(self.streamed_bytes)} read per token) through a "
                f"{format_bytes(self.ring_bytes)} buffer, "
                + ("read ahead by a background thread" if self.read_ahead else
                   "read by the decode step's threads as reached" + (
                       f" ({self.cached_fraction:.0%} of it in the page cache)" if self.cached_fraction >= 0 else ""))
                + self._context())

    def _context(self) -> str:
        if not self.context_tokens:
            return ""
        return (f"; the budget holds up to {self.context_tokens:,} tokens of prompt and new tokens per row at "
                f"batch {self.batch} (KV cache: {self.kv_cache})")

    def as_dict(self) -> dict:
        return {"resident_layers": self.resident_layers, "streamed_layers": self.streamed_layers,
                "resident_bytes": self.resident_bytes, "streamed_bytes": self.streamed_bytes,
                "ring_bytes": self.ring_bytes, "workspace_bytes": self.workspace_bytes,
                "predicted_peak_bytes": self.predicted_peak_bytes, "budget_bytes": self.budget_bytes,
                "files": self.files, "read_ahead": self.read_ahead, "cached_fraction": self.cached_fraction,
                "context_tokens": self.context_tokens, "batch": self.batch, "kv_cache": self.kv_cache}


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            out.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(out)


def _workspace_bytes(skeleton: nn.Module, batch: int, prompt_tokens: int, new_tokens: int, streamed: bool,
                     kv_format: KVFormat | None = None, eval_chunk: int | None = None) -> int:
    """The runtime generate's peak beyond its weights (KV cache, activations, workspace), predicted
    on fake tensors with the cache sized exactly; with ``streamed``, the int4 layers run on their
    saved layout, as streamed ones do (the Python prefill's kernel then needs other temporaries).
    With ``eval_chunk``, the workload is `memfit.evaluate.runtime_perplexity` over windows of
    ``prompt_tokens``, that many tokens a forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.memory.report import weight_bytes
    from memfit.models.meta import meta_copy, to_fake
    from memfit.profile import runtime_generate_report, runtime_perplexity_report, synthetic_input_facts
    from memfit.workload import Mode, Workload

    fake = meta_copy(skeleton)
    if streamed:
        _plain_layouts(decoder_parts(fake).layers.modules())
    mode = FakeTensorMode()
    to_fake(fake, mode, torch.device("cpu"))
    workload = Workload(mode=Mode.GENERATE, batch_size=batch, seq_len=prompt_tokens, new_tokens=new_tokens)
    with mode, synthetic_input_facts():
        if eval_chunk is not None:
            report = runtime_perplexity_report(fake, prompt_tokens, eval_chunk, kv_format)
        else:
            report = runtime_generate_report(fake, workload, cache_step=1, kv_format=kv_format)
    return report.peak_bytes - weight_bytes(fake)


def plan_placement(skeleton: nn.Module, stored: dict[str, StoredTensor], budget: int, *, batch: int = 1,
                   prompt_tokens: int, new_tokens: int, overhead: int = 0,
                   resident_layers: int | None = None, kv_format: KVFormat | None = None,
                   eval_chunk: int | None = None, ring_bytes: int | None = None,
                   page_aligned: bool = False) -> Placement:
    """The placement of ``skeleton`` (a meta model) that fits ``budget`` bytes with the most
    layers resident (or with the first ``resident_layers`` resident, if given).

    It also says how long a context the budget holds with that placement (`Placement.context_tokens`):
    the workspace (KV cache, attention's per-column temporaries) grows linearly with the tokens, so
    one more prediction, `CONTEXT_PROBE` tokens longer, gives its growth per token; the length that
    gives is then predicted itself, and stepped back until it fits. With ``eval_chunk`` the workload
    is perplexity over windows of ``prompt_tokens`` (see `_workspace_bytes`), and no context is predicted.
    ``ring_bytes``: the ring's size (at least the smallest that works; default: the smallest plus
    what the budget leaves, up to a whole pass). ``page_aligned``: the streamed units are laid out for
    reads around the page cache (`layer_units`).

    Raises:
        BudgetError: no placement fits; the message names the smallest budget that does.
    """
    parts = decoder_parts(skeleton)
    count = len(parts.layers)
    layer_prefixes = [f"{parts.layers_fqn}.{i}." for i in range(count)]
    layer_bytes = [sum(t.nbytes for n, t in stored.items() if n.startswith(p)) for p in layer_prefixes]
    other_bytes = sum(t.nbytes for n, t in stored.items() if not n.startswith(f"{parts.layers_fqn}."))

    def workspace(new: int, streamed: bool) -> int:
        return _workspace_bytes(skeleton, batch, prompt_tokens, new, streamed, kv_format, eval_chunk) + overhead

    workspaces = [workspace(new_tokens, streamed) for streamed in (False, True)]
    units = [u for i in range(count) for u in layer_units(skeleton, i, stored, page_aligned)]

    def need(resident: int) -> tuple[int, int]:
        streamed = [u for u in units if u.layer >= resident]
        ring = ring_minimum(streamed) if streamed else 0
        workspace = workspaces[bool(streamed)]
        return other_bytes + sum(layer_bytes[:resident]) + workspace + ring + (SLACK if streamed else 0), ring

    choices = range(count, -1, -1) if resident_layers is None else [resident_layers]
    resident = next((k for k in choices if need(k)[0] <= budget), None)
    if resident is None:
        smallest, k = min((need(k)[0], k) for k in choices)
        held = "every layer resident" if k == count else f"{k} layers resident, {count - k} streamed"
        raise BudgetError(
            f"the smallest placement needs {format_bytes(smallest)} ({smallest} bytes: {held}), "
            f"over --max-memory {format_bytes(budget)}",
            f"pass --max-memory {smallest} or more, fewer new tokens, or a more compressed model (memfit compress)")
    used, ring = need(resident)
    streamed_bytes = sum(layer_bytes[resident:])
    if ring_bytes is not None:  # asked for: at least the smallest
        ring = max(ring, aligned(ring_bytes))
    elif resident < count:  # the rest of the budget deepens the read-ahead, up to a pass
        ring = min(ring + (budget - used) // ALIGN * ALIGN,
                   aligned(sum(u.nbytes for u in units if u.layer >= resident)) + ring)
    files = sorted({str(t.path) for t in stored.values()})
    streams = resident < count
    context = 0 if eval_chunk is not None else _context_tokens(
        lambda new: used - workspaces[streams] + workspace(new, streams), budget, prompt_tokens, new_tokens, used,
        int(getattr(skeleton.config, "max_position_embeddings", 0) or 0))
    return Placement(list(range(resident)), list(range(resident, count)), other_bytes + sum(layer_bytes[:resident]),
                     streamed_bytes, ring, workspaces[streams], budget, files, context_tokens=context, batch=batch,
                     kv_cache=kv_format.token if kv_format is not None else "model dtype")


def _context_tokens(need, budget: int, prompt_tokens: int, new_tokens: int, used: int, limit: int) -> int:
    """The longest prompt plus new tokens whose ``need(new tokens)`` (``used`` at ``new_tokens``) fits
    ``budget``, up to the model's context ``limit`` (0: none): the workspace's growth per token from one prediction
    `CONTEXT_PROBE` tokens longer, then that length predicted, stepped back until it fits."""
    per_token = max(need(new_tokens + CONTEXT_PROBE) - used, 1) / CONTEXT_PROBE
    extra = int((budget - used) / per_token)
    if limit:
        extra = min(extra, max(limit - prompt_tokens - new_tokens, 0))
    for _ in range(4):  # the growth is linear but for rounding (cache groups, allocator blocks): check, step back
        over = need(new_tokens + extra) - budget if extra else 0
        if over <= 0:
            break
        extra = max(extra - int(over / per_token) - 1, 0)
    return prompt_tokens + new_tokens + extra


def load_streamed(ref: str | Path, max_memory: int, *, batch: int = 1, prompt_tokens: int, new_tokens: int,
                  ahead: int | None = None, overhead: int = 0, count_rss: bool = True,
                  resident_layers: int | None = None, kv_format: KVFormat | None = None,
                  eval_chunk: int | None = None, page_cache: bool = True,
                  ring_bytes: int | None = None) -> tuple[nn.Module, StreamedWeights | None, Placement]:
    """Load ``ref`` to run in ``max_memory`` bytes: ``(model, streamed weights or None, placement)``.

    ``ahead``: units the background reader may read ahead (0: none, the step's threads read each
    unit when it is reached; None: decide from the page cache: read ahead unless `CACHED` of the
    streamed bytes are in it, where reads are copies that the step's threads make faster). ``overhead``:
    bytes the process already holds that count against the budget (`memfit generate` passes
    what building the model's modules added); with ``count_rss`` the growth of the process while the
    modules are built is added to it. ``resident_layers``: keep exactly the first this many layers
    resident (default: as many as fit). ``kv_format``: the run's KV cache is quantized so.
    ``eval_chunk``: the run is `memfit.evaluate.runtime_perplexity` over windows of ``prompt_tokens``
    (``new_tokens`` 0), that many tokens a forward. ``page_cache=False``: streamed reads leave
    nothing in the page cache (`StreamedWeights`' ``drop``, with O_DIRECT where the file system
    allows), so every token reads the disk; reads are then ahead by default (they wait on the disk
    rather than copy). ``ring_bytes``: see `plan_placement`.

    Raises:
        BudgetError: the budget is below the smallest placement (the message says which budget works).
        ModelNotFoundError, CheckpointError: ``ref`` is not a readable model directory.
    """
    from memfit.memory.rss import rss_bytes, trim_freed_memory

    stored = stored_tensors(ref)
    before = rss_bytes()
    chosen: list[Placement] = []

    def select(skeleton: nn.Module):
        # the modules are built (meta tensors): place, then read only the resident tensors
        trim_freed_memory()
        built = max(rss_bytes() - before, 0) if count_rss else 0
        placement = plan_placement(skeleton, stored, max_memory, batch=batch, prompt_tokens=prompt_tokens,
                                   new_tokens=new_tokens, overhead=overhead + built, resident_layers=resident_layers,
                                   kv_format=kv_format, eval_chunk=eval_chunk, ring_bytes=ring_bytes,
                                   page_aligned=not page_cache)
        trim_freed_memory()  # the prediction's fake tensors and copies, given back before the weights come
        if ahead is None and placement.streamed_layers and page_cache:  # asked before this process reads them
            placement.cached_fraction = StreamedWeights.cached_fraction(
                [u for i in placement.streamed_layers for u in layer_units(skeleton, i, stored)])
        chosen.append(placement)
        prefix = f"{decoder_parts(skeleton).layers_fqn}."
        streamed = set(placement.streamed_layers)
        return lambda name: not (name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) in streamed)

    model = load_partial(ref, select)
    placement = chosen[0]
    if not placement.streamed_layers:
        return model, None, placement
    units = [u for i in placement.streamed_layers for u in layer_units(model, i, stored, not page_cache)]
    _plain_layouts(slot.module for unit in units for slot in unit.slots)
    if ahead is None:  # page-cache reads are copies by a core: the step's threads copy faster than one reader
        ahead = 0 if page_cache and placement.cached_fraction >= CACHED else READ_AHEAD
    placement.read_ahead = ahead > 0
    return model, StreamedWeights(units, placement.ring_bytes, ahead, drop=not page_cache), placement


def _plain_layouts(modules) -> None:
    """Streamed int4 weights are read as saved (the plain nibble layout), not converted."""
    from memfit.strategies.quantize.kernels import PLAIN

    for module in modules:
        if hasattr(module, "layout"):
            module.layout = PLAIN
