"""The decoder forward the runtime compiles: a llama-family model read through its own modules,
with a static KV cache written in place.

`Decoder` takes the parts of a Hugging Face decoder-only model (embedding, layers, final norm,
output head) and runs them without transformers' per-call machinery (mask builders, cache
objects, output dataclasses). Projections, MLPs and norms are called as the model's own modules,
so every format memfit saves runs unchanged: packed int8/int4/fp8 Linears, bitmask-sparse and
low-rank layers, LoRA adapters merged or not, structurally pruned shapes. What this module does
itself is the attention: rotary embedding from a table precomputed once for every position (by
the model's own rotary module, so any rope scaling it implements is kept), the new keys and
values written into `KVCache` at their columns, and scaled dot-product attention over the whole
static cache with a mask, so every decode step has the same shapes and compiles once.

Rows are left-padded: all rows of a batch end at the same column, row ``b`` starts at column
``pad[b]``, and its rotary positions count from there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memfit import native
from memfit.errors import RecipeError
from memfit.models.arch import LAYOUTS, decoder_parts, layout_of
from memfit.runtime.kvcache import KVCache, KVFormat, read, write

SUPPORTED = tuple(LAYOUTS)


def runs_on_runtime(model: nn.Module) -> bool:
    """Whether the runtime runs ``model``'s architecture."""
    return getattr(getattr(model, "config", None), "model_type", None) in LAYOUTS


class Decoder:
    """A causal LM's forward over a `KVCache`.

    Args:
        model: a Hugging Face decoder-only model of a type in `memfit.models.arch.LAYOUTS`.

    Raises:
        RecipeError: the architecture is not one the runtime knows.
    """

    def __init__(self, model: nn.Module, streamed=None, kv_format: KVFormat | None = None) -> None:
        config = model.config
        if not runs_on_runtime(model):
            raise RecipeError(
                f"the runtime does not know model type {getattr(config, 'model_type', None)!r}",
                f"it runs {', '.join(SUPPORTED)}",
            )
        self.model, self.config, self.layout = model, config, layout_of(model)
        base = getattr(model, getattr(model, "base_model_prefix", "model"))
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.layers = list(decoder_parts(model).layers)[: config.num_hidden_layers]
        self.head = model.get_output_embeddings()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.dtype = self.norm.weight.dtype
        self.device = self.norm.weight.device
        window = getattr(config, "sliding_window", None)
        self.window = window if window and getattr(config, "use_sliding_window", True) else None
        self._cos = self._sin = None
        self.streamed = streamed  # `memfit.runtime.streamed.StreamedWeights`, or None
        self.kv_format = kv_format  # the cache's quantization (None: the keys' and values' own dtype)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A zeroed cache for ``batch`` rows of up to ``max_len`` tokens; sizes the rotary table too."""
        self.rotary_table(max_len)
        # under autocast the projections give keys and values in the autocast dtype: hold them in it
        device_type = self.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.dtype
        return KVCache.allocate(len(self.layers), batch, self.kv_heads, max_len, self.head_dim, dtype, self.device,
                                self.kv_format)

    def rotary_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] in the model's dtype, from the model's rotary module (computed once)."""
        if self._cos is None or self._cos.shape[0] < length:
            positions = torch.arange(length, device=self.device)[None]
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                cos, sin = self.rotary(probe, positions)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos, self._sin

    def forward(
        self, ids: torch.Tensor, columns: torch.Tensor, pad: torch.Tensor, cache: KVCache, last_only: bool = True
    ) -> torch.Tensor:
        """Logits for ``ids`` [B, T] placed at cache columns ``columns`` [T] (consecutive).

        ``pad`` [B]: the first column of each row (its left padding). Returns float logits
        [B, V] for the last position, or [B, T, V] with ``last_only=False``.
        """
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # [B, T]
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [B, 1, T, D]
        keys = torch.arange(cache.max_len, device=ids.device)  # [L]
        allowed = (keys[None, None, :] <= columns[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
        if self.window is not None:
            allowed &= keys[None, None, :] > columns[None, :, None] - self.window
        # a padding position sees itself, so no row of the mask is empty (an all-masked row gives
        # NaN in some attention kernels, and NaN keys would poison later steps through 0 * NaN)
        allowed |= keys[None, None, :] == columns[None, :, None]
        mask = allowed[:, None]  # [B, 1, T, L]
        h = self.embed(ids)
        streamed = self.streamed
        if streamed is not None:
            streamed.start_pass()
        for i, layer in enumerate(self.layers):
            # a streamed layer's units are acquired as they are reached and released after their last use
            s = streamed if streamed is not None and streamed.streams(i) else None
            h = h + self._attention(layer, h, cos, sin, mask, columns, cache.keys[i], cache.values[i], s)
            x = getattr(layer, self.layout.post_attention_norm)(h)
            if s is not None:
                s.release()  # attention output
            h = h + self._mlp(getattr(layer, self.layout.mlp), x, s)
        h = self.norm(h[:, -1:] if last_only else h)
        logits = project(self.head, h).float()
        return logits[:, -1] if last_only else logits

    __call__ = forward

    def _attention(self, layer, h, cos, sin, mask, columns, key_cache, value_cache, streamed=None) -> torch.Tensor:
        """The attention block's output for the residual stream ``h``; with ``streamed``, its
        attention-output unit is left acquired (the caller releases it after the post-attention norm)."""
        names = self.layout
        block = getattr(layer, names.attention)
        if streamed is not None:
            streamed.acquire()  # attention inputs
        x = getattr(layer, names.input_norm)(h)
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q = project(getattr(block, names.q), x).view(shape).transpose(1, 2)  # [B, H, T, D]
        k = project(getattr(block, names.k), x).view(shape).transpose(1, 2)  # [B, KV, T, D]
        v = project(getattr(block, names.v), x).view(shape).transpose(1, 2)
        if streamed is not None:
            streamed.release()
            streamed.acquire()  # attention output
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        write(key_cache, columns, k)
        write(value_cache, columns, v)
        if t == 1:
            keys, values = read(key_cache, torch.float32, columns), read(value_cache, torch.float32, columns)
            out = _attend_one(q, keys, values, mask, self.scaling, fused=self.kv_format is KVFormat.INT8)
        else:
            keys, values = read(key_cache, q.dtype, columns), read(value_cache, q.dtype, columns)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=q.shape[1] != keys.shape[1])
        return project(getattr(block, names.o), out.transpose(1, 2).reshape(b, t, -1))

    @staticmethod
    def _mlp(mlp: nn.Module, x: torch.Tensor, streamed=None) -> torch.Tensor:
        # the gated MLP of every architecture in LAYOUTS, its projections through `project`; any
        # other module (a replaced or restructured MLP) is called as it is
        if streamed is not None:  # gate and up, then down (`memfit.runtime.streamed` checked the layout)
            streamed.acquire(2)
            gated = mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x)
            streamed.release(2)
            streamed.acquire()
            out = project(mlp.down_proj, gated)
            streamed.release()
            return out
        if type(mlp).__name__ in GATED_MLPS and _plain_call(mlp):
            return project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))
        return mlp(x)


GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x))


def _plain_call(module: nn.Module) -> bool:
    # nothing (a hook, a patched forward) changes what calling the module does
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a float ``nn.Linear`` at decode rows runs memfit's native kernel (at one row
    PyTorch's float matmuls read the weight at about half the bandwidth the kernel does)."""
    if (type(module) is nn.Linear and module.weight.dtype == x.dtype and _plain_call(module)
            and native.weight_supported(native.KIND_BF16 if x.dtype == torch.bfloat16 else native.KIND_F32,
                                        *module.weight.shape) and native.applies(x)):
        out = native.gemv_float(x.reshape(-1, x.shape[-1]), module.weight).reshape(*x.shape[:-1], -1)
        return out if module.bias is None else out + module.bias
    return module(x)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: float, fused: bool = False) -> torch.Tensor:
    """Attention of one query per row [B, H, 1, D] over the whole cache [B, KV, L, D], in float32.

    A decode step's attention as plain matmuls and a softmax, which the compiler fuses: PyTorch's
    CPU flash-attention kernel took 165 us per layer for one bf16 query over 256 keys (a third of
    the demo model's bf16 decode step), this about a tenth of that. Query heads are grouped by the
    key-value head they share (GQA) instead of repeating the cache. ``fused`` (an int8 cache): products
    and sums instead of matmuls, so the compiler folds the dequantization into them (on the demo
    model's compiled step, 2.4 ms a token less than dequantizing each layer to a float copy first).
    """
    b, h, _, d = q.shape
    kv = keys.shape[1]
    grouped = q.reshape(b, kv, h // kv, d).float()  # [B, KV, G, D]
    if fused:  # products and sums the compiler fuses with the dequantization: no float copy of the cache
        scores = (grouped[:, :, :, None, :] * keys[:, :, None]).sum(-1) * scale
    else:
        scores = grouped @ keys.float().transpose(-1, -2) * scale  # [B, KV, G, L]
    probs = scores.masked_fill(~mask[:, :, 0, None, :], float("-inf")).softmax(-1)  # mask [B, 1, 1, L]
    out = (probs[..., None] * values[:, :, None]).sum(-2) if fused else probs @ values.float()  # [B, KV, G, D]
    return out.reshape(b, h, 1, d).to(q.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
