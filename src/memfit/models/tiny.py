"""Tiny random models built from transformers configs, seeded, for fast tests (no network).

``tiny-llama`` mirrors the demo model's structure (GQA, tied embeddings) at hidden size 64;
``tiny-qwen2`` adds q/k/v biases and an untied output head. Both use a byte-level tokenizer whose
256 tokens are the 256 byte values, so any text encodes.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

SEED = 0
VOCAB_SIZE = 256

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=1024,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

CONFIGS = {
    "tiny-llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "tiny-qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=False),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the UTF-8 bytes of the text (256 tokens, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256 + n.
    code = ord(ch)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build tiny model ``name`` (a key of `CONFIGS`) with seeded random weights, in fp32."""
    config = CONFIGS[name]()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), byte_tokenizer()
