"""Decoder layer by decoder layer: capture the first layer's inputs, then for each layer let a
method observe and change it, and pass its outputs on.

Inputs of a layer are computed by the layers before it *after* they were changed (quantized), so
each layer is fitted to the inputs it will see, as GPTQ prescribes. Only one layer's activations
for the calibration windows are held at a time (plus the next layer's, while they are computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from memfit.memory.fake import shape_determined
from memfit.models.arch import decoder_parts

if TYPE_CHECKING:
    from memfit.workload import Context

LayerInputs = list[tuple[torch.Tensor, dict[str, Any]]]
"""One ``(hidden_states, keyword arguments)`` pair per calibration batch, as the layer receives them."""


class _Captured(Exception):
    """Raised by the first layer's hook once its inputs are recorded: nothing after it needs to run."""


def capture_first_layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> LayerInputs:
    """Run each batch up to the first decoder layer and record what that layer receives."""
    first = decoder_parts(model).layers[0]
    captured: LayerInputs = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        captured.append((hidden.detach(), kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Captured):
                    model(batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs for every batch, paired with the same keyword arguments.

    Without hooks inside the layer (nothing observes it), a batch's forward allocates by shapes
    alone: a prediction on fake tensors runs each distinct shape once and replays the rest
    (`memfit.memory.fake.shape_determined`)."""

    def forward(hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    observed = any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
    run = forward if observed else shape_determined(forward)  # a new cache per call: the layer is fixed
    with torch.no_grad():
        return [(run(hidden, kwargs), kwargs) for hidden, kwargs in inputs]


def observe_inputs(
    layer: nn.Module, inputs: LayerInputs, observers: dict[nn.Module, Callable[[torch.Tensor], None]]
) -> None:
    """Run ``layer`` on ``inputs``, calling ``observers[module](x)`` with the input ``x`` of each
    listed submodule every time it runs."""
    def hook(observe: Callable[[torch.Tensor], None]):
        def pre_hook(module: nn.Module, args: tuple) -> None:  # returns None: the input stays as it was
            observe(args[0].detach())

        return pre_hook

    handles = [module.register_forward_pre_hook(hook(observe)) for module, observe in observers.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()


def calibrate_layers(
    model: nn.Module,
    calibration: torch.Tensor | Sequence[torch.Tensor],
    process: Callable[[int, nn.Module, LayerInputs], None],
    ctx: Context,
    label: str,
    finish: Callable[[int, nn.Module], None] | None = None,
    after_capture: Callable[[], None] | None = None,
) -> None:
    """Call ``process(index, layer, inputs)`` on every decoder layer in order, where ``inputs``
    are what the layer receives given the (already processed) layers before it.

    Args:
        calibration: token windows [N, T] (one batch per window) or a sequence of batches [B, T].
        process: observes the layer on ``inputs`` and changes it in place.
        label: progress bar description.
        finish: called on each layer once its outputs are computed (to pack what is left).
        after_capture: called once the first layer's inputs are captured, when the embedding
            and output head are no longer needed (to pack them early).

    With ``ctx.source`` (a streamed checkpoint), everything but the decoder layers and an untied
    head is read first, each layer just before it is processed, and the rest at the end.
    """
    batches = [w[None] for w in calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    was_training = model.training
    model.eval()
    parts = decoder_parts(model)
    source = ctx.source
    try:
        if source is not None:
            source.materialize_outside(model, parts.layers_fqn)
        inputs = capture_first_layer_inputs(model, batches)
        if after_capture is not None:
            after_capture()
        for index, layer in enumerate(parts.layers):
            if source is not None:
                source.materialize(model, f"{parts.layers_fqn}.{index}")
            process(index, layer, inputs)
            inputs = run_layer(layer, inputs)
            if finish is not None:
                finish(index, layer)
            ctx.report(label, index + 1, len(parts.layers))
        if source is not None:
            source.materialize(model)
    finally:
        model.train(was_training)


class InputStatistics:
    """Accumulates X^T X of the inputs of chosen Linear layers while a layer runs.

    Linears fed the same tensor (q, k and v; gate and up) share one sum.

    Example:
        >>> with InputStatistics(linears) as stats:
        ...     run_layer(layer, inputs)
        >>> stats.hessian("self_attn.q_proj")
    """

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._key: dict[str, str] = {}  # Linear -> the Linear whose sum it shares
        self._last: tuple[torch.Tensor, str] | None = None  # (the last input seen, whose sum holds it)

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.linears.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:  # the previous Linear's input: share its sum
                self._key[name] = self._last[1]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            product = flat.t() @ flat
            self._last, self._key[name] = (x, name), name
            if name in self._sums:
                self._sums[name] += product
            else:
                self._sums[name] = product
            self._rows[name] = self._rows.get(name, 0) + flat.shape[0]

        return hook

    def observed(self, name: str) -> bool:
        """True if Linear ``name`` ran while the statistics were taken."""
        return name in self._key

    def hessian(self, name: str) -> torch.Tensor:
        """2 X^T X / rows: the Hessian of the layer's squared output error, for GPTQ."""
        key = self._key[name]
        return 2 * self._sums[key] / self._rows[key]
