"""Memory-lean optimizers: `AdamW8bit` (both moments as 8-bit codes) and `MasterWeights` (low-precision
weights stepped through fp32 copies).

Why our own 8-bit AdamW rather than bitsandbytes' or torchao's: bitsandbytes runs on the CPU, but
its CPU step dequantizes each whole parameter's moments to fp32 inside one opaque custom op (four
fp32 copies of the largest parameter at once, invisible to a dispatch-level tracker), and it cannot
be built under ``FakeTensorMode`` (its code map is made with ``.tolist()``), so memfit could neither
predict nor measure it. torchao's ``AdamW8bit`` holds its state as tensor subclasses and compiles its
step with ``torch.compile`` (23 s for the first step of a 1024x1024 parameter on this CPU). `AdamW8bit`
is plain tensor code: the same on CPU and CUDA, on fake tensors (so `memfit.estimate` predicts it),
and it walks each parameter in chunks, so its temporaries are bounded by the chunk, not the
parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

BLOCK = 256  # elements per absmax scale
CHUNK = 1 << 18  # elements dequantized at once (a multiple of BLOCK): ~1 MiB fp32 per temporary
MIN_8BIT_NUMEL = 1024  # smaller parameters (norms, biases) keep fp32 moments (bitsandbytes: 4096)


DECADES = 7  # magnitudes 10^-6 .. 10^0 of a block's absmax


def _grid_steps(decade: int, signed: bool) -> int:
    # signed: 1, 2, ..., 32, 63 magnitudes per sign (126); unsigned: 2, 4, ..., 128 (254)
    return min(2**decade, 63) if signed else 2 ** (decade + 1)


def _code_values(signed: bool) -> list[float]:
    """The 256 values codes 0..255 stand for, in [-1, 1] (signed) or [0, 1] (unsigned).

    Code 0 is zero, code 1 is one (and code 2 minus one, when signed). Then, for each decade
    10^-6 .. 10^0, an evenly spaced grid of fractions of that decade in [0.1, 1) (bin midpoints),
    whose size doubles per decade: small magnitudes keep their relative precision (a second moment
    spans many decades within one block) and large ones get the finest steps. Signed codebooks
    hold the positive grid in codes 3..128, the negative one in 129..254. The idea is the dynamic
    tree quantization of Dettmers et al. (2022); the layout is ours, chosen so that
    `_Codebook.encode_` finds a code with arithmetic instead of a search.
    """
    magnitudes = [
        10.0 ** (decade - DECADES + 1) * (0.1 + 0.9 * (j + 0.5) / _grid_steps(decade, signed))
        for decade in range(DECADES)
        for j in range(_grid_steps(decade, signed))
    ]
    values = [0.0, 1.0, -1.0, *magnitudes, *[-m for m in magnitudes], 0.0] if signed else [0.0, 1.0, *magnitudes]
    assert len(values) == 256, len(values)
    return values


LUT_SHIFT = 13  # a float32's bits >> 13: sign, exponent and the top 10 mantissa bits (19 bits)
_LUTS: dict[tuple[bool, str], torch.Tensor] = {}


def _lookup_table(signed: bool, device: torch.device) -> torch.Tensor:
    """uint8 [2^19]: for each float32 bit pattern's top 19 bits, the code nearest to the middle of
    that range (values within 1/2048 of each other share an entry; codes are >= 1.4% apart).

    Built once per device, outside any dispatch mode: memfit's tracker does not count these 512 KiB,
    and on fake tensors (predictions) the step uses a fake view of it.
    """
    key = (signed, str(device))
    if key not in _LUTS:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            values = torch.tensor(_code_values(signed), dtype=torch.float32)
            ordered, order = values.sort()
            midpoints = (ordered[1:] + ordered[:-1]) / 2
            keys = torch.arange(1 << (32 - LUT_SHIFT), dtype=torch.int32)
            centers = ((keys << LUT_SHIFT) | (1 << (LUT_SHIFT - 1))).view(torch.float32)
            nearest = order[torch.searchsorted(midpoints, centers.nan_to_num(0.0))].to(torch.uint8)
            _LUTS[key] = nearest.to(device)
    return _LUTS[key]


class _Codebook:
    """Decoding and encoding for one codebook on one device."""

    def __init__(self, signed: bool, device: torch.device, fake_mode=None) -> None:
        self.values = torch.tensor(_code_values(signed), dtype=torch.float32, device=device)  # 1 KiB, per step
        if fake_mode is None:
            self.table = _lookup_table(signed, device)
        else:
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                meta = torch.empty(1 << (32 - LUT_SHIFT), dtype=torch.uint8, device="meta")
            self.table = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, meta, device)

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """uint8 [blocks * BLOCK] + fp32 [blocks] -> fp32 [blocks, BLOCK]."""
        return self.values[codes.int()].view(-1, BLOCK) * absmax[:, None]

    def encode_(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """fp32 [blocks, BLOCK] -> ``codes`` (uint8) and ``absmax`` (fp32), in place: each value
        divided by its block's absmax, then its code looked up by its top 19 bits."""
        torch.amax(x.abs(), dim=1, out=absmax)
        normalized = x / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        keys = normalized.view(torch.int32).view(-1).bitwise_right_shift_(LUT_SHIFT)
        keys.bitwise_and_((1 << (32 - LUT_SHIFT)) - 1)
        codes.copy_(self.table[keys])


def _evaluate(closure: Any) -> Any:
    """The loss a ``step(closure)`` returns: the closure run with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _fake_mode(t: torch.Tensor):
    """The `FakeTensorMode` ``t`` belongs to (a prediction), or None for a real tensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t.fake_mode if isinstance(t, FakeTensor) else None


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (FSDP2), otherwise ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose two moments are held as 8-bit codes, scaled per block of 256 elements.

    Under FSDP2 it steps each rank's local shard, and its state is local tensors (``local_state``).

    Held per parameter of n elements (n >= 1024): 2n bytes of codes plus 8 bytes per block of 256
    (two fp32 scales), about 25.4% of fp32 AdamW's 8n. Smaller parameters keep fp32 moments. The
    update is AdamW's, computed in fp32 on a chunk of the parameter at a time (the moments are
    decoded, updated and re-encoded), so the step's temporaries are a few chunks, not a parameter.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in `torch.optim.AdamW`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.local_state = True
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW8bit settings: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        local = _local(p)
        state = self.state[p]
        state["step"] = 0
        n = local.numel()
        if n < MIN_8BIT_NUMEL:
            state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32)
            return state
        blocks = math.ceil(n / BLOCK)
        state["exp_avg_codes"] = torch.zeros(blocks * BLOCK, dtype=torch.uint8, device=local.device)
        state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
        state["exp_avg_sq_codes"] = torch.zeros(blocks * BLOCK, dtype=torch.uint8, device=local.device)
        state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _evaluate(closure)
        books: dict[torch.device, tuple[_Codebook, _Codebook]] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if p in self.state else self._init_state(p)
                state["step"] += 1
                step = state["step"]
                param, grad = _local(p), _local(p.grad)
                if param.device not in books:
                    fake = _fake_mode(param)
                    books[param.device] = (_Codebook(True, param.device, fake), _Codebook(False, param.device, fake))
                args = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step)
                if "exp_avg" in state:
                    _adamw_chunk(param.view(-1), grad.view(-1), state["exp_avg"].view(-1),
                                 state["exp_avg_sq"].view(-1), *args)
                else:
                    self._step_8bit(param, grad, state, books[param.device], *args)
        return loss

    @staticmethod
    def _step_8bit(param, grad, state, books, lr, beta1, beta2, eps, weight_decay, step) -> None:
        signed, unsigned = books
        flat_p, flat_g = param.view(-1), grad.view(-1)
        n = flat_p.numel()
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            b0, b1 = start // BLOCK, math.ceil(end / BLOCK)
            m_codes = state["exp_avg_codes"][b0 * BLOCK : b1 * BLOCK]
            v_codes = state["exp_avg_sq_codes"][b0 * BLOCK : b1 * BLOCK]
            m_absmax, v_absmax = state["exp_avg_absmax"][b0:b1], state["exp_avg_sq_absmax"][b0:b1]
            m = signed.decode(m_codes, m_absmax).view(-1)
            v = unsigned.decode(v_codes, v_absmax).view(-1)
            length = end - start
            _adamw_chunk(flat_p[start:end], flat_g[start:end], m[:length], v[:length],
                         lr, beta1, beta2, eps, weight_decay, step)
            if length < m.numel():  # the last block's padding stays zero
                m[length:] = 0
                v[length:] = 0
            signed.encode_(m.view(-1, BLOCK), m_codes, m_absmax)
            unsigned.encode_(v.view(-1, BLOCK), v_codes, v_absmax)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every loaded state tensor to its parameter's dtype; codes are uint8 (0..255
        # survive the round trip exactly).
        for state in self.state.values():
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if key in state:
                    state[key] = state[key].to(torch.uint8)


def _adamw_chunk(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update of ``p`` (any float dtype) with fp32 moments ``m``, ``v``, in place."""
    g = g.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    del g
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    update = (m / (1 - beta1**step)).div_(denom)
    del denom
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


class MasterWeights(torch.optim.Optimizer):
    """Steps low-precision (bf16) parameters through fp32 master copies.

    Each parameter has an fp32 copy and its own inner optimizer; a step converts one gradient at a
    time to fp32, steps that parameter's copy, writes it back rounded to the parameter's dtype and
    drops the fp32 gradient. Held: 4 bytes per parameter for the copies, plus the inner optimizer's
    state over fp32; the step's temporaries are one parameter's fp32 gradient. The learning rate
    and other group settings live in this optimizer's ``param_groups`` (schedulers set them there).

    Args:
        params: the low-precision parameters.
        make: builds the inner optimizer over a list of one fp32 parameter, given group settings.
        defaults: group settings (``lr`` ...), copied to the inner optimizers at each step.
    """

    def __init__(self, params: Iterable[nn.Parameter], make, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.local_state = True  # fp32 copies of local shards
        self._make = make
        self.masters: list[nn.Parameter] = []
        self.inner: list[torch.optim.Optimizer] = []
        for group in self.param_groups:
            for p in group["params"]:
                master = nn.Parameter(_local(p).detach().float(), requires_grad=True)
                self.masters.append(master)
                self.inner.append(make([master], {k: v for k, v in group.items() if k != "params"}))

    @property
    def state_tensors(self) -> list[Any]:
        """Everything the optimizer holds: master copies and the inner optimizers' state."""
        return [self.masters, [opt.state for opt in self.inner]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _evaluate(closure)
        index = 0
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                master, inner = self.masters[index], self.inner[index]
                index += 1
                if p.grad is None:
                    continue
                for inner_group in inner.param_groups:
                    inner_group.update(settings)
                master.grad = _local(p.grad).float()
                p.grad = None
                inner.step()
                master.grad = None
                _local(p).copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "param_groups": super().state_dict()["param_groups"],
            "masters": [m.detach() for m in self.masters],
            "inner": [opt.state_dict() for opt in self.inner],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for master, saved in zip(self.masters, state_dict["masters"], strict=True):
            master.data.copy_(saved)
        for opt, saved in zip(self.inner, state_dict["inner"], strict=True):
            opt.load_state_dict(saved)


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer and Stern, 2018) with `torch.optim.Adafactor`'s defaults and update.

    A matrix [..., R, C] keeps factored second moments: one row mean [..., R, 1] and one column
    mean [..., 1, C] (R + C numbers instead of R x C); a vector keeps its full second moment. No
    first moment. The step is written with tensor arithmetic where torch's reads ``.item()``, so it
    also runs on fake tensors (memfit predicts its memory); tests check it against torch's.

    Args:
        lr: the largest relative step; ``beta2_decay``, ``eps``, ``d``, ``weight_decay`` as in torch.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.local_state = True  # steps local shards under FSDP2, like AdamW8bit
        if lr < 0 or beta2_decay > 0 or d < 1 or weight_decay < 0:
            raise ValueError(f"invalid Adafactor settings: lr={lr}, beta2_decay={beta2_decay}, d={d}")
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, (eps1, eps2), d = group["lr"], group["eps"], group["d"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param, grad = _local(p), _local(p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if grad.dim() > 1:
                        state["row_var"] = grad.new_zeros(grad.shape[:-1] + (1,))
                        state["col_var"] = grad.new_zeros(grad.shape[:-2] + (1, grad.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(grad)
                state["step"] += 1
                step = state["step"]
                floor = torch.finfo(param.dtype).eps if eps1 is None else eps1
                one_minus_beta2 = step ** group["beta2_decay"]
                rms = param.norm(2) / param.numel() ** 0.5
                alpha = rms.clamp(min=eps2) * min(lr, 1 / step**0.5)
                if group["weight_decay"]:
                    param.mul_(1 - lr * group["weight_decay"])
                if grad.dim() > 1:
                    row_var, col_var = state["row_var"], state["col_var"]
                    row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
                    col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
                    estimate = row_var @ col_var
                    estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=floor))
                else:
                    state["variance"].lerp_(grad * grad, one_minus_beta2)
                    estimate = state["variance"].clone()
                update = estimate.clamp_(min=floor * floor).rsqrt_().mul_(grad)
                del estimate
                denom = (update.norm(2) / (update.numel() ** 0.5 * d)).clamp(min=1.0)
                param.sub_(update.mul_(alpha / denom))
        return loss
