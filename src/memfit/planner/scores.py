"""The planner's quality prediction: a plan's divergence from the model, from scores measured once.

`PlanScorer` predicts the KL divergence (nats per token, on the first `SENSITIVITY_TOKENS`
calibration tokens) of a plan's next-token distributions from the model's as the sum of its
strategies' divergences:

- a strategy that holds every decoder block in one `BlockOption` (``int8``, ``int4-gN``, whatever
  its method: `Strategy.uniform_block`) adds up its blocks' scores (`block_scores`: each block alone
  in each option, measured once);
- mixed formats add up the scores of the blocks they choose (the same exact allocation they make
  when applied, from the same scores);
- any other strategy (pruning, low-rank factors, a cast) is applied alone to a copy of the model,
  once, and its divergence measured on the same tokens;
- a quantized KV cache (``kv-int8``, ``kv-int4``, a generation plan's run setting) is measured
  once through memfit's runtime, every position's logits computed over the cache as stored,
  against the same runtime with the cache in the model's dtype.

The sum is a first-order approximation: small independent errors add. Scores of calibrated methods
(GPTQ, AWQ) are those of rounding to nearest on the same grid, an upper bound. The planner uses the
prediction only to rank which plans it evaluates for real.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memfit.evaluate import WINDOW
from memfit.plan import Plan, apply
from memfit.runtime import Engine
from memfit.runtime.kvcache import KVFormat
from memfit.strategies.base import Strategy
from memfit.strategies.quantize.mixed import MixedBits, block_options, block_scores, sensitivity_batches, units_of
from memfit.strategies.targets import Targets
from memfit.workload import Context, ProgressFn

LABEL = "predicting quality"


class PlanScorer:
    """Predicted divergence of plans applied to ``model`` (left unchanged).

    Args:
        model: the model the plans apply to.
        calibration: calibration windows (the first 512 tokens are scored; calibrated strategies
            measured whole are applied with all of them).
        memo: shared with the planner's applications (`Context.memo`), so mixed formats applied
            later reuse the block scores.
        progress: progress callback.
    """

    def __init__(self, model: nn.Module, calibration: Sequence[torch.Tensor], memo: dict | None = None,
                 progress: ProgressFn | None = None) -> None:
        self.model = model
        self.ctx = Context(calibration=calibration, progress=progress, memo={} if memo is None else memo)
        self.units = units_of(model, Targets())
        self.options = block_options()
        self._blocks: list[dict[str, float]] | None = None
        self._whole: dict[Strategy, float] = {}
        self._reference: list[torch.Tensor] | None = None
        self._runtime_reference: list[torch.Tensor] | None = None
        self._kv: dict[KVFormat, float] = {}

    def __call__(self, plan: Plan) -> float:
        """The plan's predicted divergence (nats per token; 0 for the empty plan)."""
        kv = plan.settings.kv_cache
        return sum(self.strategy(s) for s in plan.strategies) + (0.0 if kv is None else self.kv_cache(kv))

    def resolve(self, plan: Plan) -> Plan:
        """``plan`` with the choices its mixed formats would make on this model filled in, from the
        measured scores (the same exact allocation as applying them): its bytes then predict exactly."""
        strategies = tuple(
            dataclasses.replace(s, choices=s.choose(self.model, self.units, self.ctx))
            if isinstance(s, MixedBits) and not s.choices else s
            for s in plan.strategies
        )
        return dataclasses.replace(plan, strategies=strategies)

    def upper_bound(self, plan: Plan) -> bool:
        """True if a format of ``plan`` is scored by rounding to nearest but applied by a calibrated
        method (GPTQ, AWQ): its divergence is predicted too high."""
        return any(s.needs_calibration and (s.uniform_block in self.options or isinstance(s, MixedBits))
                   for s in plan.strategies)

    def strategy(self, strategy: Strategy) -> float:
        """One strategy's divergence, applied alone."""
        token = strategy.uniform_block
        if token in self.options:
            return sum(unit[token] for unit in self.blocks())
        if isinstance(strategy, MixedBits):
            scores = self.blocks()
            choices = strategy.choices or strategy.choose(self.model, self.units, self.ctx)
            return sum(unit[choice] for unit, choice in zip(scores, choices, strict=True))
        if strategy not in self._whole:
            self._whole[strategy] = self._measure_whole(strategy)
        return self._whole[strategy]

    def kv_cache(self, kv_format: KVFormat) -> float:
        """A quantized KV cache's divergence, measured once: the runtime's next-token distributions
        with the cache in ``kv_format`` against the same runtime's with the cache in the model's dtype."""
        if kv_format not in self._kv:
            batches = sensitivity_batches(self.ctx.calibration)
            label = f"{LABEL}: {kv_format.token}"
            self.ctx.report(label, 0, 1)
            if self._runtime_reference is None:
                self._runtime_reference = _runtime_log_probs(self.model, batches, None)
            quantized = _runtime_log_probs(self.model, batches, kv_format)
            self._kv[kv_format] = _divergence(self._runtime_reference, quantized)
            self.ctx.report(label, 1, 1)
        return self._kv[kv_format]

    def blocks(self) -> list[dict[str, float]]:
        """Per unit (`units_of`), the divergence of each `BlockOption`, measured on first use."""
        if self._blocks is None:
            self._blocks = block_scores(self.model, self.units, self.options, self.ctx, LABEL)
            if self._blocks is None:
                raise ValueError("the planner's quality prediction needs a model with values (not meta or fake)")
        return self._blocks

    def _measure_whole(self, strategy: Strategy) -> float:
        batches = sensitivity_batches(self.ctx.calibration)
        if self._reference is None:
            self._reference = _log_probs(self.model, batches)
        work = copy.deepcopy(self.model)
        self.ctx.report(f"{LABEL}: {strategy.token}", 0, 1)
        apply(work, Plan((strategy,)), Context(calibration=self.ctx.calibration))
        log_q = _log_probs(work, batches)
        self.ctx.report(f"{LABEL}: {strategy.token}", 1, 1)
        return _divergence(self._reference, log_q)


def _divergence(log_p: list[torch.Tensor], log_q: list[torch.Tensor]) -> float:
    """Mean KL(p || q) per token (nats) over batches of log-probabilities [tokens, vocab]."""
    total = sum(F.kl_div(q, p, reduction="sum", log_target=True).item() for p, q in zip(log_p, log_q, strict=True))
    return total / sum(p.shape[0] for p in log_p)


def _runtime_log_probs(model: nn.Module, batches: Sequence[torch.Tensor],
                       kv_format: KVFormat | None) -> list[torch.Tensor]:
    """`_log_probs` through memfit's runtime, every position computed over the KV cache as stored."""
    engine = Engine(model, compile=False, native=False, cache_step=1, kv_format=kv_format)
    with torch.no_grad():
        return [torch.cat([F.log_softmax(logits.float(), dim=-1) for _, logits in engine.logits(ids[0], WINDOW)])
                for ids in batches]


def _log_probs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-probabilities [tokens, vocab] (fp32) of each batch [1, T]."""
    with torch.no_grad():
        return [F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1).flatten(0, 1) for ids in batches]
