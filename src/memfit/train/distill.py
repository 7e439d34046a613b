"""`distill`: knowledge distillation of a student from a frozen teacher, on `memfit.train`'s loop.

The student is a memfit recipe applied to the teacher (``drop-layers-6``, ``prune-mlp-25``,
``int4-g128-gptq,lora-8``, where only the adapters train), or another model with the same
tokenizer. Each step runs the teacher without gradients, then the student, and matches the
student's next-token distribution to the teacher's at every position: forward KL on
temperature-scaled logits (Hinton et al.), reverse KL, or the generalized Jensen-Shannon
divergence (GKD), mixed with the plain next-token loss by ``alpha``.

Neither model's full-vocabulary logits are ever held for a whole batch: the student's output
head is swapped, for the step, for one that takes the final hidden states and computes the loss
over `CHUNK` positions at a time, each chunk under activation checkpointing (its logits, the
teacher's, and the softmaxes are freed after its forward and recomputed in backward). The student
forward still goes through the wrapped model (DDP, FSDP2), so gradients sync as in training.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.errors import RecipeError
from memfit.train.loop import TrainResult
from memfit.train.teacher_cache import CHUNK, ShapeOnlyCache, TeacherCache, prepare_teacher_cache

JSD_BETA = 0.5  # the generalized JSD's mixture weight of the teacher
REST_FLOOR = 1e-6  # the least mass a teacher cache gives the tokens outside its top K
HIDDEN_LOSSES = ("cosine", "mse")


class Divergence(enum.Enum):
    """What the student minimizes against the teacher, per position."""

    KL = "kl"  # KL(teacher || student): mass-covering (the default)
    REVERSE_KL = "reverse-kl"  # KL(student || teacher): mode-seeking
    JSD = "jsd"  # generalized Jensen-Shannon with mixture weight JSD_BETA

    @classmethod
    def parse(cls, text: str) -> Divergence:
        try:
            return cls(text)
        except ValueError:
            raise RecipeError(f"unknown distillation loss {text!r}",
                              f"use one of {', '.join(d.value for d in cls)}") from None


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation loss.

    Args:
        divergence: see `Divergence`.
        temperature: both models' logits are divided by it; the divergence is scaled by its square
            (so that its gradients keep their size as it changes).
        alpha: the divergence's weight; ``1 - alpha`` goes to the plain next-token loss.
        chunk: positions whose logits are computed at once.
        hidden: also match the student's decoder layers' outputs to the teacher's layers they
            came from (`layer_map`): ``"cosine"`` (1 - cosine similarity per position) or
            ``"mse"``, averaged over positions and layers; None: logits only.
        hidden_weight: that loss's weight, added to the logits' loss.
    """

    divergence: Divergence = Divergence.KL
    temperature: float = 1.0
    alpha: float = 1.0
    chunk: int = CHUNK
    hidden: str | None = None
    hidden_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise RecipeError(f"--temperature must be positive, got {self.temperature}", "pass e.g. --temperature 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"--alpha must be within [0, 1], got {self.alpha}",
                              "pass the divergence's share of the loss, e.g. --alpha 1 (distillation only)")
        if self.chunk < 1:
            raise RecipeError(f"the chunk must be at least 1 position, got {self.chunk}", "pass a positive chunk")
        if self.hidden not in (None, *HIDDEN_LOSSES):
            raise RecipeError(f"unknown hidden-state loss {self.hidden!r}", f"use one of {', '.join(HIDDEN_LOSSES)}")
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise RecipeError(f"--hidden-weight must be a non-negative number, got {self.hidden_weight}",
                              "pass e.g. --hidden-weight 1")

    def fingerprint(self) -> dict[str, Any]:
        hidden = {"hidden_loss": self.hidden, "hidden_weight": self.hidden_weight} if self.hidden else {}
        return {"loss": self.divergence.value, "temperature": self.temperature, "alpha": self.alpha, **hidden}


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence) -> torch.Tensor:
    """The divergence of each row's distributions, summed over rows (float32 logits [N, V])."""
    return log_divergence(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), kind)


def log_divergence(log_s: torch.Tensor, log_t: torch.Tensor, kind: Divergence) -> torch.Tensor:
    """`divergence` of distributions given as log-probabilities over the same buckets ([N, V], or
    a teacher cache's top-K tokens plus the rest, [N, K + 1]; an empty bucket is -inf on both sides)."""
    if kind is Divergence.KL:
        return _kl(log_t, log_s)
    if kind is Divergence.REVERSE_KL:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_t + math.log(JSD_BETA), log_s + math.log(1 - JSD_BETA))
    return JSD_BETA * _kl(log_t, log_m) + (1 - JSD_BETA) * _kl(log_s, log_m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over rows; buckets where p is 0 add nothing (and pass no gradient, not NaN)."""
    p = log_p.exp()
    kept = p > 0
    return (p * (torch.where(kept, log_p, 0.0) - torch.where(kept, log_q, 0.0))).sum()


def bucketed(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, K + 1] of tokens ``ids`` [N, K] and of all the others together, from a
    full distribution's [N, V]."""
    rest = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, ids), rest], dim=-1)


def with_rest(top: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A cache entry's top-K log-probabilities [N, K] plus the remaining mass's, [N, K + 1]: at
    least `REST_FLOOR` (float16 rounding can push the stored mass to 1), or none when K covers the
    whole vocabulary."""
    top = top.float()
    if top.shape[-1] >= vocab_size:
        rest = top.new_full((*top.shape[:-1], 1), float("-inf"))
    else:
        rest = torch.log((1 - top.exp().sum(-1, keepdim=True)).clamp(min=REST_FLOOR))
    return torch.cat([top, rest], dim=-1)


def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                   config: DistillConfig) -> torch.Tensor:
    """The loss `Distiller` computes, from whole [B, S, V] logits at once (for tests and checks)."""
    t = config.temperature
    s, te = student_logits.float(), teacher_logits.float()
    kd = divergence((s / t).flatten(0, 1), (te / t).flatten(0, 1), config.divergence) / (s.shape[0] * s.shape[1])
    ce = F.cross_entropy(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return config.alpha * t * t * kd + (1 - config.alpha) * ce


class Distiller:
    """The training objective of a distillation run: ``distiller(trained, ids, rows)`` is the step's loss.

    Args:
        student: the unwrapped student (its output head is swapped during each forward).
        teacher: the frozen teacher, on the student's device; or None with ``cache``.
        config: the loss.
        cache: the teacher's stored top-K log-probabilities (`TeacherCache`), read for the batch's
            windows (``rows``) instead of running a teacher.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig,
                 cache: TeacherCache | None = None) -> None:
        if (teacher is None) == (cache is None):
            raise ValueError("a Distiller takes a teacher or a teacher cache")
        if teacher is not None:
            check_pair(student, teacher)
        elif config.hidden:
            raise RecipeError("--hidden-loss compares the teacher's hidden states, which a teacher cache does not hold",
                              "drop --teacher-cache or --hidden-loss")
        self.head = student.get_output_embeddings()
        self.teacher, self.config, self.cache = teacher, config, cache
        if teacher is not None:
            self.teacher_body, self.teacher_head = teacher.base_model, teacher.get_output_embeddings()
        # the student's layers but its last (whose output is normed) against the teacher's they came from
        self.layers = layer_map(student, teacher)[:-1] if config.hidden else []

    def tensors(self) -> list[torch.Tensor]:
        """The teacher's weights: held for the whole run, on top of the student's."""
        return [] if self.teacher is None else [*self.teacher.parameters(), *self.teacher.buffers()]

    def __call__(self, trained: nn.Module, ids: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        if self.cache is not None:
            if rows is None:
                raise ValueError("a cached teacher is read by window: pass the batch's rows")
            top_ids, top = self.cache.lookup(rows)
            teacher = (top_ids.to(ids.device).flatten(0, 1), top.to(ids.device).flatten(0, 1))
        else:
            with torch.no_grad():
                out = self.teacher_body(input_ids=ids, use_cache=False, output_hidden_states=bool(self.layers))
                hidden = out.last_hidden_state
                matched = [out.hidden_states[j + 1] for j in self.layers]  # layer j's output
                del out
            teacher = (hidden.reshape(-1, hidden.shape[-1]),)
        head = self.head
        head.forward = lambda hidden: self._loss(hidden, teacher, ids)
        try:
            out = trained(input_ids=ids, use_cache=False, output_hidden_states=bool(self.layers))
        finally:
            del head.forward
        loss = out.logits  # the loss, from the swapped head
        if self.layers:
            loss = loss + self.config.hidden_weight * self._hidden_loss(out.hidden_states[1:], matched)
        return loss

    def _hidden_loss(self, student: tuple[torch.Tensor, ...], teacher: list[torch.Tensor]) -> torch.Tensor:
        """The mean over the matched layers of the per-position distance of their outputs."""
        total = 0.0
        for mine, theirs in zip(student, teacher, strict=False):  # the student's last output is not matched
            mine, theirs = mine.float(), theirs.float()
            if self.config.hidden == "cosine":
                total = total + (1 - F.cosine_similarity(mine, theirs, dim=-1)).mean()
            else:
                total = total + F.mse_loss(mine, theirs)
        return total / len(teacher)

    def _loss(self, hidden: torch.Tensor, teacher: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        flat = hidden.reshape(-1, width)
        targets = torch.cat([ids[:, 1:], ids.new_full((batch, 1), -100)], dim=1).reshape(-1)
        kd = ce = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], self.config.chunk):
            rows = slice(start, start + self.config.chunk)
            chunk_kd, chunk_ce = checkpoint(self._chunk, flat[rows], targets[rows], *[t[rows] for t in teacher],
                                            use_reentrant=False)
            kd, ce = kd + chunk_kd, ce + chunk_ce
        t, alpha = self.config.temperature, self.config.alpha
        return alpha * t * t * kd / (batch * seq) + (1 - alpha) * ce / max(batch * (seq - 1), 1)

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor, *teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The chunk's divergence and next-token loss, summed; ``teacher``: its final hidden states,
        or a cache's top-K ids and log-probabilities."""
        logits = type(self.head).forward(self.head, hidden).float()  # the head's own forward, not the swap
        zero = logits.new_zeros(())
        ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") if self.config.alpha < 1 else zero
        if self.config.alpha == 0:
            return zero, ce
        t, kind = self.config.temperature, self.config.divergence
        if self.cache is not None:
            top_ids, top = teacher
            student = bucketed(F.log_softmax(logits / t, dim=-1), top_ids)
            return log_divergence(student, with_rest(top, logits.shape[-1]), kind), ce
        with torch.no_grad():
            teacher_logits = self.teacher_head(teacher[0]).float()
        return divergence(logits / t, teacher_logits / t, kind), ce


def layer_map(student: nn.Module, teacher: nn.Module) -> list[int]:
    """For each of the student's decoder layers, the teacher's layer it corresponds to: the same
    index when both have as many; else the teacher's layer whose weights it still equals (a
    ``drop-layers`` student before training), in order; else evenly spaced (the last to the last)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from memfit.models.arch import decoder_parts

    mine, theirs = decoder_parts(student).layers, decoder_parts(teacher).layers
    evenly = [round((i + 1) * len(theirs) / len(mine)) - 1 for i in range(len(mine))]
    if len(mine) == len(theirs):
        return list(range(len(mine)))
    if any(isinstance(p, FakeTensor) or p.is_meta for p in student.parameters()):
        return evenly  # a prediction: which layers match does not change the bytes

    def same(a: nn.Module, b: nn.Module) -> bool:
        pa, pb = list(a.parameters()), list(b.parameters())
        return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb, strict=True))

    found, j = [], 0
    for layer in mine:
        while j < len(theirs) and not same(layer, theirs[j]):
            j += 1
        if j == len(theirs):
            return evenly
        found.append(j)
        j += 1
    return found


def check_pair(student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Refuse a student and teacher whose tokens mean different things, or a head the swap cannot replace.

    Raises:
        RecipeError: the vocabularies (sizes, or the tokenizers' token-to-id maps) differ; the model
            scales or caps its logits after the head (the chunked loss would skip that).
    """
    sizes = (student.config.vocab_size, teacher.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise RecipeError(f"the student's vocabulary has {sizes[0]} tokens and the teacher's {sizes[1]}",
                          "distill between models that share a tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        mine, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if mine != theirs:
            differing = sorted(set(mine.items()) ^ set(theirs.items()))
            raise RecipeError(f"the student's tokenizer differs from the teacher's ({len(differing)} token ids "
                              f"differ, e.g. {differing[0][0]!r})", "distill between models that share a tokenizer")
    for model in (student, teacher):
        for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(model.config, key, None) not in (None, 1, 1.0):
                raise RecipeError(f"{type(model).__name__} changes its logits after the output head ({key}), "
                                  "which memfit's chunked distillation loss does not do yet",
                                  "distill a llama-family model (Llama, Qwen2, SmolLM, Mistral)")


def split_student(student: str, teacher: str, recipe: str) -> tuple[str, str]:
    """``(model reference, recipe)`` of the run: a student recipe is applied to the teacher's
    weights (plus ``recipe``, the training's own tokens); a model reference trains itself.

    Raises:
        RecipeError: ``student`` is neither a recipe nor a model.
    """
    from memfit.errors import ModelNotFoundError
    from memfit.models.refs import resolve_loadable
    from memfit.plan import Plan

    try:
        Plan.parse(student)
    except RecipeError as as_recipe:
        try:
            resolve_loadable(student)
        except ModelNotFoundError:
            raise RecipeError(f"--student {student!r} is neither a recipe ({as_recipe.message}) nor a model",
                              "pass a recipe applied to the teacher (drop-layers-6) or a model directory") from None
        return student, recipe
    if Path(student).exists():  # a directory named like a recipe is still a directory
        return student, recipe
    joined = ",".join(t for t in (student, recipe) if t and t != "none") or "none"
    return teacher, joined


RECOVERY_LORA = "lora-8"  # the adapters a quantized student trains


def recovery_student(plan) -> str | None:
    """The student recipe whose distillation from the unchanged model recovers what ``plan`` (a
    `memfit.plan.Plan` or recipe) cost, for the planner to weigh: the plan itself when its
    strategies leave trainable float weights ("prune or drop, then distill"), with `RECOVERY_LORA`
    adapters added when any packs its weights ("quantize, then distill the adapters"); None when
    nothing in it costs quality that training wins back (`memfit.strategies.base.Recovery`)."""
    from memfit.plan import Plan
    from memfit.strategies.base import Recovery
    from memfit.strategies.training import LoRA

    plan = Plan.parse(plan) if isinstance(plan, str) else plan
    kinds = {type(s).recovers() for s in plan.strategies}
    if Recovery.ADAPTERS in kinds:
        has_adapters = any(isinstance(s, LoRA) for s in plan.strategies)
        return plan.recipe if has_adapters else Plan.parse(f"{plan.recipe},{RECOVERY_LORA}").recipe
    return plan.recipe if Recovery.WEIGHTS in kinds else None


def fake_objective(teacher: str | Path, config: DistillConfig, top_k: int | None, seq: int):
    """`memfit.estimate`'s ``objective`` for a distillation step: a `Distiller` over the fake
    student, with the teacher's skeleton on fake tensors, or a shape-only cache of ``top_k``."""
    from memfit.io import skeleton
    from memfit.models.meta import to_fake

    def objective(student_skeleton: nn.Module, mode, device) -> Distiller:
        if top_k is not None:
            vocab = student_skeleton.config.vocab_size
            return Distiller(student_skeleton, None, config, ShapeOnlyCache(top_k, seq, vocab))
        teacher_skeleton = skeleton(str(teacher)).eval()
        teacher_skeleton.requires_grad_(False)
        to_fake(teacher_skeleton, mode, device)
        return Distiller(student_skeleton, teacher_skeleton, config)

    return objective


def estimate_distill(teacher: str | Path, student: str | Path, workload, *, recipe: str = "none",
                     config: DistillConfig | None = None, top_k: int | None = None):
    """Predict a distillation step's memory on fake tensors, as `memfit.estimate` predicts a
    training step: the student under its recipe and optimizer, the teacher's weights held (or,
    with ``top_k``, a teacher cache's lookups instead) and its forward, the chunked loss.

    Args:
        teacher, student, recipe: as `distill`.
        workload: a training `memfit.workload.Workload` (batch, sequence, one process).
        config: the loss (chunk size, and ``alpha``, which decides what the chunks compute).
        top_k: the teacher comes from a cache of this K (the teacher is not loaded).

    Returns:
        The `memfit.memory.report.MemoryReport` of the step's peak.
    """
    from memfit.estimate import estimate

    model_ref, run_recipe = split_student(str(student), str(teacher), recipe)
    objective = fake_objective(teacher, config or DistillConfig(), top_k, workload.seq_len)
    return estimate(model_ref, run_recipe, workload, objective=objective)


@dataclasses.dataclass
class DistillResult(TrainResult):
    """`memfit.train.loop.TrainResult` of the student, plus the distillation's settings."""

    teacher: str = ""
    config: DistillConfig = DistillConfig()
    teacher_cache_bytes_per_token: int | None = None  # None: the teacher ran in memory

    def to_json(self) -> dict[str, Any]:
        """`TrainResult.to_json` plus ``teacher``, ``loss``, ``temperature``, ``alpha`` and
        ``teacher_cache_bytes_per_token`` (null without a cache)."""
        return {**super().to_json(), "teacher": self.teacher, **self.config.fingerprint(),
                "teacher_cache_bytes_per_token": self.teacher_cache_bytes_per_token}


def distill(
    teacher: str | Path,
    student: str | Path,
    *,
    data: str | None = None,
    steps: int = 100,
    batch: int = 8,
    seq: int = 256,
    recipe: str = "none",
    loss: str | Divergence = Divergence.KL,
    temperature: float = 1.0,
    alpha: float = 1.0,
    hidden_loss: str | None = None,
    hidden_weight: float = 1.0,
    lr: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    save_every: int = 0,
    device: str | None = None,
    budget: int | str | None = None,
    teacher_cache: str | Path | None = None,
    top_k: int | None = None,
    progress=None,
    work_progress=None,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` on ``data``; `memfit.train`'s loop, result and checkpoints.

    Args:
        teacher: a model reference `memfit.load` accepts, in any memfit format (an int8 teacher
            holds a quarter of its fp32 bytes); frozen, no gradients.
        student: a recipe applied to the teacher's weights (``"drop-layers-6"``,
            ``"int4-g128-gptq,lora-8"``), or a model reference with the teacher's tokenizer.
        recipe: the training's own tokens (optimizer, LoRA, checkpointing...), as in `memfit.train`.
        loss: ``"kl"`` (default), ``"reverse-kl"`` or ``"jsd"``; see `Divergence`.
        temperature, alpha, hidden_loss, hidden_weight: see `DistillConfig` (``hidden_loss``: its ``hidden``).
        teacher_cache: a directory for the teacher's top-``top_k`` log-probabilities
            (`TeacherCache`): built on first use by one teacher pass over the run's windows, then
            read instead of running the teacher, which is not loaded.
        top_k: the cache's K (default 64; an existing cache's own).
        budget: bytes (or ``"2GiB"``) the run may hold, teacher included: without ``grad-accum-N``
            in the recipe, the largest micro-batch whose predicted step (`estimate_distill`) fits.
        The rest: as `memfit.train`.

    Returns:
        The `DistillResult`.

    Raises:
        RecipeError: an unknown loss or student, a student whose vocabulary differs from the
            teacher's, bad numbers, ``top_k`` without a cache.
        CheckpointError: a teacher cache from another teacher, data or setting.
        The errors `memfit.train` raises.
    """
    from memfit.io import load, load_tokenizer
    from memfit.train import distributed, loop

    loop.check_sizes(steps, batch, seq, save_every)
    config = DistillConfig(Divergence.parse(loss) if isinstance(loss, str) else loss, temperature, alpha,
                           hidden=hidden_loss, hidden_weight=hidden_weight)
    model_ref, run_recipe = split_student(str(student), str(teacher), recipe)
    loop.check_run_dir(out, resume)
    if hidden_loss and teacher_cache is not None:
        raise RecipeError("--hidden-loss compares the teacher's hidden states, which a teacher cache does not hold",
                          "drop --teacher-cache or --hidden-loss")
    if top_k is not None and teacher_cache is None:
        raise RecipeError("--top-k sets the size of a teacher cache", "pass --teacher-cache DIR with it")
    cache, teacher_model, teacher_tokenizer = None, None, load_tokenizer(str(teacher))
    if teacher_cache is not None:
        cache = prepare_teacher_cache(teacher_cache, teacher, data=data, seq=seq, seed=seed, steps=steps, batch=batch,
                                      temperature=temperature, top_k=top_k, device=device, progress=work_progress)
    else:
        teacher_model, teacher_tokenizer = load(str(teacher))
        teacher_model.requires_grad_(False)

    def objective(model: nn.Module, tokenizer, world) -> Distiller:
        if cache is not None:
            if cache.meta["vocab_size"] != model.config.vocab_size:
                raise RecipeError(f"the student's vocabulary has {model.config.vocab_size} tokens and the "
                                  f"teacher cache's {cache.meta['vocab_size']}",
                                  "distill between models that share a tokenizer")
            check_pair(model, model, tokenizer, teacher_tokenizer)
            return Distiller(model, None, config, cache)
        check_pair(model, teacher_model, tokenizer, teacher_tokenizer)
        return Distiller(model, teacher_model.to(world.device), config)

    extra = {"teacher": str(teacher), **config.fingerprint(),
             **({"teacher_cache": cache.fingerprint()} if cache is not None else {})}
    try:
        result = loop.run(model_ref, None, device, data=data, steps=steps, batch=batch, seq=seq, recipe=run_recipe,
                          lr=lr, budget=budget, seed=seed, out=None if out is None else Path(out), resume=resume,
                          save_every=save_every, progress=progress, work_progress=work_progress,
                          objective=objective, fingerprint_extra=extra,
                          predict_objective=fake_objective(teacher, config, cache and cache.top_k, seq))
    finally:
        distributed.leave()
    return DistillResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(TrainResult)},
                         teacher=str(teacher), config=config,
                         teacher_cache_bytes_per_token=None if cache is None else cache.bytes_per_token)
