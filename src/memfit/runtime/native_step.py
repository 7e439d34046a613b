"""`NativeStep`: the decode step of a whole model in one call of memfit's C library (``native/step.c``).

The compiled step (`engine.compiled_step`) still crosses into Python or the dispatcher for every
packed matmul (211 calls per token of the demo model, about 5 us each) and runs the graph's own
small kernels in between; at one token the demo model's int8 weights take about 4 ms to read, and
those crossings cost as much again. `NativeStep` hands the model to C once, as a table of
pointers to its own tensors (weights as memfit packed them, norms, rotary table, static cache),
and runs every layer of a token in one call, with the threads in one parallel region.

It runs what `Decoder.forward` runs for one token per row, in the same dtypes; it takes models
whose every part it knows (`NativeStep.unsupported` says what it does not), and the engine
runs the compiled or eager step for the rest: LoRA adapters, low-rank factors, bitmask-sparse or
float8 layers, hooks, CUDA, autocast. Nothing needs compiling but the C library (once per
machine), so the first token comes without torch.compile's tracing and code generation.

On fake tensors (the estimator) the step computes nothing and allocates what the real one does:
its scratch and logits buffer, once per cache.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from memfit import native
from memfit.runtime.decoder import GATED_MLPS, Decoder, _plain_call
from memfit.runtime.kvcache import KVCache

NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / rms(x), float32 statistics
SILU = ("SiLU", "SiLUActivation")


class _Weight(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pad_", ctypes.c_int32), ("data", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class _Linear(ctypes.Structure):
    _fields_ = [("w", _Weight), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                *[(name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")],
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("streamed", ctypes.c_int64)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("vocab", ctypes.c_int64), ("batch", ctypes.c_int64), ("max_len", ctypes.c_int64),
                ("window", ctypes.c_int64), ("eps", ctypes.c_float), ("scaling", ctypes.c_float),
                ("act_bf16", ctypes.c_int32), ("embed_int8", ctypes.c_int32), ("embed", ctypes.c_void_p),
                ("embed_scale", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("head", _Linear), ("layers", ctypes.POINTER(_Layer)),
                ("stream", ctypes.c_void_p), ("threads", ctypes.c_int64)]


class _Unsupported(Exception):
    """A part of the model the native step does not run (the message says which)."""


def _address(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    return 0 if is_fake(t) or t.is_meta else t.data_ptr()


def _weight(module: nn.Module, dtype: torch.dtype, name: str) -> native.NativeWeight:
    """``module``'s weight as the kernels read it, for activations of ``dtype``."""
    if not _plain_call(module):
        raise _Unsupported(f"{name} has hooks or a patched forward")
    if type(module) is nn.Linear:
        weight = module.weight
        if weight.dtype != dtype or dtype not in (torch.float32, torch.bfloat16):
            raise _Unsupported(f"{name} holds {weight.dtype} weights for {dtype} activations")
        kind = native.KIND_BF16 if dtype == torch.bfloat16 else native.KIND_F32
        spec = native.NativeWeight(kind, weight)
    else:
        describe = getattr(module, "native_weight", None)
        spec = describe() if describe is not None else None
        if spec is None:
            raise _Unsupported(f"{name} is a {type(module).__module__}.{type(module).__qualname__}")
        if getattr(module, "out_dtype", dtype) != dtype:
            raise _Unsupported(f"{name} computes in {module.out_dtype}, the model in {dtype}")
    if not spec.supported:
        raise _Unsupported(f"{name} has a shape the kernels do not take ({list(spec.data.shape)})")
    if not spec.data.is_contiguous():
        raise _Unsupported(f"{name}'s weight is not contiguous")
    return spec


def _linear(module: nn.Module, dtype: torch.dtype, name: str, keep: list) -> _Linear:
    spec = _weight(module, dtype, name)
    bias = getattr(module, "bias", None)
    if bias is not None and bias.dtype != dtype:
        raise _Unsupported(f"{name}'s bias is {bias.dtype}, the model {dtype}")
    keep.extend(t for t in (spec.data, spec.scale, spec.zero, bias) if t is not None)
    n, k = spec.shape
    return _Linear(_Weight(spec.kind, 0, _address(spec.data), _address(spec.scale), _address(spec.zero), n, k,
                           spec.group), _address(bias))


def _norm(module: nn.Module, dtype: torch.dtype, name: str, keep: list) -> tuple[int, float]:
    if type(module).__name__ not in NORMS or not _plain_call(module):
        raise _Unsupported(f"{name} is a {type(module).__module__}.{type(module).__qualname__}")
    if module.weight.dtype != dtype:
        raise _Unsupported(f"{name}'s weight is {module.weight.dtype}, the model {dtype}")
    keep.append(module.weight)
    return _address(module.weight), float(module.variance_epsilon)


class NativeStep:
    """The decode step of ``decoder``'s model in C; build with `NativeStep.create`.

    Called as the engine's step: ``step(decoder, ids [B, 1], columns [1], pad [B], cache)`` ->
    float32 logits [B, V], in a buffer the next call overwrites (sample from it first).
    """

    def __init__(self, decoder: Decoder, layers: list[dict], parts: dict, keep: list) -> None:
        self.decoder = decoder
        self._layers, self._parts, self._keep = layers, parts, keep
        self._model: _Model | None = None
        self._for: KVCache | None = None  # the cache the table was built for (its tensors never move)
        self._fake = False
        self.scratch_bytes = 0

    @staticmethod
    def unsupported(decoder: Decoder) -> str | None:
        """Why the native step cannot run ``decoder``'s model, or None if it can."""
        try:
            NativeStep._describe(decoder)
        except _Unsupported as exc:
            return str(exc)
        return None

    @classmethod
    def create(cls, decoder: Decoder) -> NativeStep | None:
        """The native step of ``decoder``'s model, or None where it does not run it (see `unsupported`)."""
        try:
            return cls(decoder, *cls._describe(decoder))
        except _Unsupported:
            return None

    @staticmethod
    def _describe(decoder: Decoder) -> tuple[list[dict], dict, list]:
        if decoder.device.type != "cpu":
            raise _Unsupported(f"the model is on {decoder.device.type}")
        if not native.available():
            raise _Unsupported("memfit's C kernels are not built")
        if decoder.kv_format is not None:
            raise _Unsupported(f"the KV cache is quantized ({decoder.kv_format.token})")
        dtype, names, keep = decoder.dtype, decoder.layout, []
        if decoder.streamed is not None:  # the table's streamed addresses are then offsets in their units
            decoder.streamed.bind_placeholders()
        if dtype not in (torch.float32, torch.bfloat16):
            raise _Unsupported(f"activations in {dtype}")
        if getattr(decoder.config, "hidden_act", "silu") != "silu":
            raise _Unsupported(f"the activation is {decoder.config.hidden_act}")
        layers, eps = [], set()
        for i, layer in enumerate(decoder.layers):
            block, mlp = getattr(layer, names.attention), getattr(layer, names.mlp)
            if type(mlp).__name__ not in GATED_MLPS or not _plain_call(mlp) or type(mlp.act_fn).__name__ not in SILU:
                raise _Unsupported(f"layer {i}'s MLP is a {type(mlp).__name__}")
            entry = {}
            for key, owner, attr in (("q", block, names.q), ("k", block, names.k), ("v", block, names.v),
                                     ("o", block, names.o), ("gate", mlp, names.gate), ("up", mlp, names.up),
                                     ("down", mlp, names.down)):
                entry[key] = _linear(getattr(owner, attr), dtype, f"layer {i} {attr}", keep)
            entry["input_norm"], e1 = _norm(getattr(layer, names.input_norm), dtype, f"layer {i} input norm", keep)
            entry["post_norm"], e2 = _norm(getattr(layer, names.post_attention_norm), dtype,
                                           f"layer {i} post-attention norm", keep)
            eps |= {e1, e2}
            heads, rem = divmod(entry["q"].w.n, decoder.head_dim)
            kv_heads, kv_rem = divmod(entry["k"].w.n, decoder.head_dim)
            if rem or kv_rem or kv_heads != decoder.kv_heads or not kv_heads or heads % kv_heads:
                raise _Unsupported(f"layer {i}'s attention shapes ({heads} heads, {kv_heads} key-value heads)")
            entry["heads"], entry["kv_heads"] = heads, kv_heads
            layers.append(entry)
        final_norm, e3 = _norm(decoder.norm, dtype, "the final norm", keep)
        if len(eps | {e3}) != 1:
            raise _Unsupported("the norms use different epsilons")
        embed = decoder.embed
        if type(embed) is nn.Embedding and embed.weight.dtype == dtype and _plain_call(embed):
            embed_spec = (0, embed.weight, None)
        else:
            spec = getattr(embed, "native_weight", lambda: None)()
            if spec is None or spec.kind != native.KIND_INT8 or getattr(embed, "out_dtype", None) != dtype:
                raise _Unsupported(f"the embedding is a {type(embed).__name__}")
            embed_spec = (1, spec.data, spec.scale)
        keep.extend(t for t in embed_spec[1:] if t is not None)
        parts = {"head": _linear(decoder.head, dtype, "the output head", keep), "final_norm": final_norm,
                 "eps": e3, "embed": embed_spec}
        return layers, parts, keep

    def _table(self, cache: KVCache) -> _Model:
        """The C table for ``cache`` (rebuilt when the engine's cache changes)."""
        if self._model is not None and self._for is cache:
            return self._model
        d, parts = self.decoder, self._parts
        cos, sin = d.rotary_table(cache.max_len)
        array = (_Layer * len(self._layers))()
        for i, entry in enumerate(self._layers):
            fields = {name: entry[name] for name in ("q", "k", "v", "o", "gate", "up", "down")}
            array[i] = _Layer(input_norm=entry["input_norm"], post_norm=entry["post_norm"],
                              keys=_address(cache.keys[i]), values=_address(cache.values[i]), heads=entry["heads"],
                              kv_heads=entry["kv_heads"], **fields)
        embed_int8, table, scale = parts["embed"]
        model = _Model(num_layers=len(self._layers), hidden=d.config.hidden_size, head_dim=d.head_dim,
                       vocab=parts["head"].w.n, batch=cache.batch, max_len=cache.max_len, window=d.window or 0,
                       eps=parts["eps"], scaling=d.scaling, act_bf16=int(d.dtype == torch.bfloat16),
                       embed_int8=embed_int8, embed=_address(table), embed_scale=_address(scale), cos=_address(cos),
                       sin=_address(sin), final_norm=parts["final_norm"], head=parts["head"], layers=array)
        streamed = d.streamed
        if streamed is not None:
            model.stream = streamed.handle
            self._patch(array, streamed)
        self._array, self._rotary = array, (cos, sin)  # the table points into these
        self._model, self._for = model, cache
        self._fake = is_fake(cache.keys[0])
        self._library, self._model_ref = native.library(), ctypes.byref(model)
        floats = self._library.memfit_step_scratch(self._model_ref)
        self._scratch = torch.empty(floats, dtype=torch.float32)
        # one logits buffer, written by every step: the engine samples from it before the next
        self._logits = torch.empty(cache.batch, parts["head"].w.n, dtype=torch.float32)
        self.scratch_bytes = floats * 4 + self._logits.nbytes
        return model

    # which unit of a streamed layer (`memfit.runtime.streamed.PARTS`) each pointer field belongs to
    _UNIT_OF = {"input_norm": 0, "q": 0, "k": 0, "v": 0, "o": 1, "post_norm": 1, "gate": 2, "up": 3, "down": 4}

    def _patch(self, array, streamed) -> None:
        """Register the streamed layers' pointer fields with the reader: acquiring a unit writes
        its place in the ring into them (the table holds each one's offset in its unit now)."""
        base = streamed.ring.data_ptr()
        units, offsets, fields = [], [], []
        for i in streamed.layers:
            array[i].streamed = 1
            start = ctypes.addressof(array[i])
            for name, part in self._UNIT_OF.items():
                if name.endswith("norm"):
                    places = [(_Layer, name)]
                else:
                    places = [(_Layer, name, _Linear, "w", _Weight, f) for f in ("data", "scale", "zero")]
                    places.append((_Layer, name, _Linear, "bias"))
                for place in places:
                    address = start
                    for struct, field in zip(place[::2], place[1::2], strict=True):
                        address += getattr(struct, field).offset
                    value = ctypes.c_void_p.from_address(address).value
                    if not value:
                        continue
                    unit = streamed.unit_index(i, part)
                    offset = value - base
                    if not 0 <= offset < streamed.units[unit].nbytes:
                        raise RuntimeError(f"layer {i} {name}: a streamed pointer outside its unit")
                    units.append(unit), offsets.append(offset), fields.append(address)
        order = sorted(range(len(units)), key=units.__getitem__)
        pick = lambda xs, t: (t * len(xs))(*[xs[j] for j in order])  # noqa: E731
        error = native.library().memfit_stream_patches(
            streamed.handle, len(units), pick(units, ctypes.c_int64), pick(offsets, ctypes.c_int64),
            pick(fields, ctypes.c_void_p))
        if error:
            raise MemoryError("registering the streamed weights' pointers")

    def greedy(self, ids: torch.Tensor, column: int, pad: torch.Tensor, cache: KVCache, steps: int) -> torch.Tensor:
        """``steps`` greedy decode steps in one call: ``ids`` [B] are the rows' current tokens, written
        at ``column``; returns the next ``steps`` tokens of each row [steps, B] (the first largest
        logit, as NumPy's argmax). The cache holds every step's keys and values afterwards."""
        self._table(cache)
        out = torch.empty(steps, cache.batch, dtype=torch.long)
        if self._fake:  # the estimator: allocations only
            return out
        current = ids.reshape(-1).clone()  # updated in place by the library, step by step
        streamed = self.decoder.streamed
        if streamed is not None:
            streamed.start_pass()
        self._library.memfit_greedy(self._model_ref, current.data_ptr(), column, pad.contiguous().data_ptr(), steps,
                                    out.data_ptr(), self._logits.data_ptr(), self._scratch.data_ptr())
        if streamed is not None:
            streamed.check()
        return out

    def __call__(self, decoder: Decoder, ids: torch.Tensor, columns: torch.Tensor, pad: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        self._table(cache)  # (re)builds the C table and buffers when the cache is new
        logits = self._logits  # [B, V], overwritten by the next step
        if self._fake:  # the estimator: allocations only
            return logits
        ids = ids.reshape(-1).contiguous()
        streamed = self.decoder.streamed
        if streamed is not None:
            streamed.start_pass()
        self._library.memfit_step(self._model_ref, ids.data_ptr(), columns.item(), pad.contiguous().data_ptr(),
                                  logits.data_ptr(), self._scratch.data_ptr())
        if streamed is not None:
            streamed.check()
        return logits
