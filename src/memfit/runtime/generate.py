"""`generate()` and `stream()`: text in, text out, through an `Engine`.

Prompts are tokenized (through the chat template with ``chat=True``), decoded by the engine, and
turned back into text incrementally: a piece is emitted once it no longer ends inside a UTF-8
character or inside a possible stop string, so what streams is exactly the final text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

from torch import nn

from memfit.errors import RecipeError
from memfit.runtime.engine import Engine
from memfit.runtime.sampling import GREEDY, Sampling


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    Attributes:
        text: the generated text (without the prompt; cut before a stop string).
        prompt_tokens, new_tokens: token counts (new tokens include an EOS that ended the row).
        ttft_s: seconds from the start to the first new token (prefill, compile included).
        decode_tokens_per_s: new tokens after the first, per second of decoding.
        kv_cache_bytes: bytes of the static cache the run used.
        compiled: whether the decode steps ran compiled (torch.compile).
        decode_step: which step decoded: ``"native"`` (memfit's C library, one call per token),
            ``"compiled"`` or ``"eager"``.
        stopped: ``"eos"``, ``"stop"`` (a stop string), or ``"length"``.
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    kv_cache_bytes: int
    compiled: bool
    decode_step: str
    stopped: str


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation config's."""
    found: list[int] = []
    sources = (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
               "eos_token_id", None), getattr(getattr(model, "config", None), "eos_token_id", None))
    for value in sources:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in found:
                found.append(int(token))
    return found


def encode(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt`` (as one user message through the chat template with ``chat``)."""
    if not prompt:
        raise RecipeError("the prompt is empty", "pass some text with --prompt or --prompt-file")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError("this tokenizer has no chat template", "drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


class _Detokenizer:
    """Turns a row's growing token list into text pieces that never need taking back."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token: int, eos: bool) -> str:
        if not eos:
            self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        safe = len(self.text)
        if not self.stopped and not eos:
            if self.text.endswith("\ufffd"):  # the last token ends inside a character
                safe = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that could grow into a stop string
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:n]):
                        safe -= n
                        break
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def stream(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = GREEDY,
    stop: Sequence[str] = (),
    chat: bool = False,
    engine: Engine | None = None,
    result: list[Generation] | None = None,
) -> Iterator[str]:
    """Yield the generated text of ``prompt`` piece by piece as tokens are produced.

    ``result``: a list the final `Generation` is appended to when the stream ends.
    """
    engine = engine or Engine(model)
    ids = encode(tokenizer, prompt, chat)
    began = time.perf_counter()
    first_at = None
    detok, stopped, count = _Detokenizer(tokenizer, stop), "length", 0
    eos = eos_ids(model, tokenizer)
    for step in engine.stream([ids], max_new_tokens, sampling, eos):
        token = step.tokens[0]
        count += 1
        if first_at is None:
            first_at = time.perf_counter()
        is_eos = token in eos
        piece = detok.push(token, is_eos)
        if piece:
            yield piece
        if is_eos or detok.stopped:
            stopped = "eos" if is_eos else "stop"
            break
    piece = detok.flush()
    if piece:
        yield piece
    end = time.perf_counter()
    if result is not None:
        first_at = first_at or end
        result.append(Generation(
            text=detok.text, prompt_tokens=len(ids), new_tokens=count, ttft_s=first_at - began,
            decode_tokens_per_s=(count - 1) / (end - first_at) if count > 1 and end > first_at else 0.0,
            kv_cache_bytes=engine.cache_bytes, compiled=engine.compiled, decode_step=engine.step_kind,
            stopped=stopped,
        ))


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = GREEDY,
    stop: Sequence[str] = (),
    chat: bool = False,
    engine: Engine | None = None,
) -> tuple[list[Generation], float]:
    """Generate for ``prompts`` decoded together as one left-padded batch.

    Returns each prompt's `Generation` (its ``decode_tokens_per_s`` is the row's share) and the
    batch's decode tokens per second (new tokens after each row's first, over the decode time).
    """
    engine = engine or Engine(model)
    ids = [encode(tokenizer, p, chat) for p in prompts]
    eos = eos_ids(model, tokenizer)
    detoks = [_Detokenizer(tokenizer, stop) for _ in prompts]
    counts, stopped = [0] * len(prompts), [None] * len(prompts)
    began, first_at = time.perf_counter(), None
    for step in engine.stream(ids, max_new_tokens, sampling, eos):
        if first_at is None:
            first_at = time.perf_counter()
        for row, token in enumerate(step.tokens):
            if token is None or stopped[row]:
                continue
            counts[row] += 1
            detoks[row].push(token, token in eos)
            if token in eos or detoks[row].stopped:
                stopped[row] = "eos" if token in eos else "stop"
        if all(stopped):
            break
    end = time.perf_counter()
    first_at = first_at or end
    decode_s = end - first_at
    rate = (sum(counts) - len(prompts)) / decode_s if decode_s > 0 else 0.0
    results = [Generation(
        text=d.text, prompt_tokens=len(i), new_tokens=c, ttft_s=first_at - began,
        decode_tokens_per_s=(c - 1) / decode_s if c > 1 and decode_s > 0 else 0.0, kv_cache_bytes=engine.cache_bytes,
        compiled=engine.compiled, decode_step=engine.step_kind, stopped=s or "length",
    ) for d, i, c, s in zip(detoks, ids, counts, stopped, strict=True)]
    return results, rate


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    compile: bool = True,
    native: bool = True,
) -> Generation:
    """Generate text for ``prompt`` with memfit's runtime (static KV cache; the decode step in
    memfit's C library where it runs the model, else compiled with ``compile``, else eager).

    Greedy by default; ``temperature > 0`` samples (with ``top_k``, ``top_p``,
    ``repetition_penalty``, from ``seed``). Stops at EOS, at a ``stop`` string (not included), or
    after ``max_new_tokens``.

    Raises:
        RecipeError: an empty prompt, a non-positive ``max_new_tokens``, a prompt longer than the
            context, a sampling value out of range, or an architecture the runtime does not know.
    """
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed)
    result: list[Generation] = []
    for _ in stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                    chat=chat, engine=Engine(model, compile=compile, native=native), result=result):
        pass
    return result[0]
