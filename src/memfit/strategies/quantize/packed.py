"""Modules that hold quantized weights as packed integers plus scales, never a float copy.

- `Int8Linear`: int8 [N, K] and one bf16 scale per output row.
- `Int4Linear`: two 4-bit values per byte [N, K // 2], and per group of input columns a bf16 scale
  and a uint8 zero point [G, N]; the last group may be shorter when ``group_size`` does not divide K.
- `Int8Embedding`: int8 [V, D] and one bf16 scale per row. With tied embeddings the output head is
  an `Int8Linear` holding the very same two tensors, so they are stored once.

Every tensor is a buffer, so ``state_dict``, ``.to()`` and byte counting see it. All constructors
work on meta tensors, which is how memfit predicts bytes without computing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memfit import native
from memfit.strategies.quantize import kernels
from memfit.strategies.quantize.kernels import PLAIN, Int4Layout


class PackedModule(nn.Module):
    """Base of memfit's quantized modules: they compute in ``out_dtype`` and keep scales in bf16.

    Their weights are frozen (buffers); when an input needs a gradient (training adapters or
    layers before them), the Linear-like ones run `_FrozenWeight`, whose backward dequantizes the
    weight for the moment it multiplies the output gradient. A plain dequantize-then-matmul would
    keep every layer's float weight alive for backward: a float copy of the whole base.
    """

    out_dtype: torch.dtype
    row_slices = False  # whether `dequantize_rows` can read a block of rows alone

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenWeight.apply(x, self)
        return self._linear(x)

    def cast_(self, dtype: torch.dtype) -> None:
        """Switch the activation dtype (the `Cast` strategy calls this); packed data is untouched."""
        self.out_dtype = dtype
        if getattr(self, "bias", None) is not None:
            self.bias = self.bias.to(dtype)


BACKWARD_CHUNK = 1 << 22  # weights dequantized at once in backward (16 MiB in fp32)


class _FrozenWeight(torch.autograd.Function):
    """``module._linear(x)`` with the gradient for ``x`` only: dx = dy @ W, W dequantized in backward
    a block of output rows at a time (about `BACKWARD_CHUNK` weights), so a large output head
    (128k x 4096 in Llama 3) never exists in float at once."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: PackedModule) -> torch.Tensor:
        ctx.module, ctx.dtype = module, x.dtype
        return module._linear(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        module = ctx.module
        rows = module.out_features
        step = max(1, BACKWARD_CHUNK // module.in_features)
        if step >= rows or not module.row_slices:
            return (grad @ module.dequantize(grad.dtype)).to(ctx.dtype), None
        out = None
        for first in range(0, rows, step):
            last = min(rows, first + step)
            part = grad[..., first:last] @ module.dequantize_rows(first, last, grad.dtype)
            out = part if out is None else out.add_(part)
        return out.to(ctx.dtype), None


class Int8Linear(PackedModule):
    """A Linear whose weight is int8 per output channel (symmetric): ``W = q * scale[:, None]``.

    Args:
        qweight: int8 [N, K].
        scale: bf16 [N].
        bias: float [N] or None.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.out_dtype = bias.dtype if bias is not None else torch.float32

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def _linear(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return kernels.int8_linear(x, self.qweight, self.scale, self.bias)

    def native_weight(self) -> native.NativeWeight | None:
        """The weight as memfit's fused decode step reads it (what `_linear` runs at a few rows)."""
        if self.scale.dtype != torch.bfloat16:
            return None
        return native.NativeWeight(native.KIND_INT8, self.qweight, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize_int8(self.qweight, self.scale, dtype)

    row_slices = True

    def dequantize_rows(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize_int8(self.qweight[first:last], self.scale[first:last], dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicLinear(Int8Linear):
    """An `Int8Linear` whose inputs are also rounded to int8, per token, when it runs (W8A8).

    Same tensors as `Int8Linear`; the matmul of long inputs (prefill) runs in integer arithmetic
    (`kernels.int8_dynamic_linear`).
    """

    def _linear(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return kernels.int8_dynamic_linear(x, self.qweight, self.scale, self.bias)


class Fp8Linear(Int8Linear):
    """A Linear whose weight is float8 (e4m3) per output channel: ``W = q * scale[:, None]``.

    Args:
        qweight: float8_e4m3fn [N, K].
        scale: bf16 [N].
        bias: float [N] or None.
    """

    def _linear(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return kernels.fp8_linear(x, self.qweight, self.scale, self.bias)

    def native_weight(self) -> None:  # no float8 kernel: the fused decode step does not run it
        return None


class Int8Embedding(PackedModule):
    """An Embedding whose table is int8 per row: ``E[v] = q[v] * scale[v]``.

    Args:
        qweight: int8 [V, D].
        scale: bf16 [V].
        out_dtype: dtype of the looked-up vectors (the model's activation dtype).
        padding_idx: as in `nn.Embedding` (kept for ``repr`` and resizing code that reads it).
    """

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.qweight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.qweight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, T] -> [B, T, D]
        rows = self.qweight[ids].to(self.out_dtype)
        return rows * self.scale[ids].to(self.out_dtype).unsqueeze(-1)

    def native_weight(self) -> native.NativeWeight | None:
        """The table as memfit's fused decode step reads its rows (int8 with bf16 scales)."""
        if self.scale.dtype != torch.bfloat16:
            return None
        return native.NativeWeight(native.KIND_INT8, self.qweight, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize_int8(self.qweight, self.scale, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


_CONVERTED = "memfit_kernel_layout"  # load_state_dict local metadata: qweight is in the kernel layout


class Int4Linear(PackedModule):
    """A Linear whose weight is 4-bit, asymmetric, in groups of ``group_size`` input columns.

    ``W[n, k] = (q[n, k] - zero_point[g, n]) * scale[g, n]`` with ``g = k // group_size``. Held: K/2
    bytes per row plus 3 bytes (bf16 scale, uint8 zero point) per group.

    Args:
        qweight: uint8 [N, K // 2] in ``layout``.
        scale: bf16 [G, N].
        zero_point: uint8 [G, N], values 0..15.
        group_size: input columns per group.
        layout: nibble layout of ``qweight`` (the CPU kernel's, or plain).
        bias: float [N] or None.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        group_size: int,
        layout: Int4Layout = PLAIN,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", bias)
        self.group_size = group_size
        self.layout = layout
        self.out_dtype = bias.dtype if bias is not None else torch.float32

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def _linear(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return kernels.int4_linear(
            x, self.qweight, self.scale, self.zero_point, self.group_size, self.layout, self.bias,
            scale_zero=self.__dict__.get("_scale_zero"),
        )

    def native_weight(self) -> native.NativeWeight | None:
        """The weight as memfit's fused decode step reads it (what `_linear` runs at a few rows), or
        None where no native kernel reads this layout or shape."""
        kind = {PLAIN: native.KIND_INT4_PLAIN, kernels.NATIVE_INT4_LAYOUT: native.KIND_INT4_BLOCKED}.get(self.layout)
        if kind is None or self.scale.dtype != torch.bfloat16:
            return None
        weight = native.NativeWeight(kind, self.qweight, self.scale, self.zero_point, self.group_size)
        return weight if weight.supported else None

    def prepare_for_runtime(self) -> int:
        """Compute the CPU kernel's scale-and-zero operand once (memfit's runtime calls this: a
        compiled step cannot feed the kernel an operand computed inside it, and computing it every
        step costs time). Held outside the buffers, [G, N, 2] bf16; returns its bytes (0 if the
        kernel does not apply)."""
        if self.layout == PLAIN or self.qweight.device.type != "cpu":
            return 0
        self.__dict__["_runtime_users"] = self.__dict__.get("_runtime_users", 0) + 1
        if "_scale_zero" not in self.__dict__:
            with torch.no_grad():
                self.__dict__["_scale_zero"] = kernels.int4_scale_zero(self.scale, self.zero_point)
        return self.__dict__["_scale_zero"].numel() * 2

    def release_runtime(self) -> None:
        """Drop the operand when the last engine that prepared it is gone."""
        users = self.__dict__.get("_runtime_users", 0) - 1
        self.__dict__["_runtime_users"] = max(users, 0)
        if users <= 0:
            self.__dict__.pop("_scale_zero", None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize_int4(self.qweight, self.scale, self.zero_point, self.group_size, self.layout, dtype)

    @property
    def row_slices(self) -> bool:
        return self.layout == PLAIN  # the CPU kernel's layout interleaves rows

    def dequantize_rows(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize_int4(self.qweight[first:last], self.scale[:, first:last],
                                       self.zero_point[:, first:last], self.group_size, PLAIN, dtype)

    # Checkpoints hold the plain layout, so they load on any CPU (the kernel layout depends on the ISA).
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != PLAIN and not self.qweight.is_meta:
            destination[prefix + "qweight"] = PLAIN.pack(self.layout.unpack(self.qweight))

    def convert_saved(self, state: dict[str, Any], prefix: str) -> dict[str, bool]:
        """Convert this module's saved (plain) ``qweight`` in ``state`` to its kernel layout, in place.

        A loader that holds the whole state calls this before ``load_state_dict``, so each plain
        tensor is freed as soon as it is converted (converting inside ``load_state_dict`` keeps
        every plain tensor alive in the caller's dict: twice the packed bytes). Returns the local
        metadata that tells ``_load_from_state_dict`` the tensor is converted already.
        """
        key = prefix + "qweight"
        if key in state and self.layout != PLAIN and not state[key].is_meta:
            blocked = native.int4_to_blocked(state[key]) if self.layout == kernels.NATIVE_INT4_LAYOUT else None
            state[key] = blocked if blocked is not None else self.layout.pack(PLAIN.unpack(state[key]))
        return {_CONVERTED: True}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, *args: Any,
                              **kwargs: Any) -> None:
        if not local_metadata.get(_CONVERTED):
            self.convert_saved(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
