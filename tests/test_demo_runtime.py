"""The decode runtime on the real demo model against transformers' eager generate.

fp32 and int8 give the same 64 greedy tokens. bf16 and int4-g128 do not stay identical for 64
tokens on this model: the runtime's bf16 matmuls and attention round differently from oneDNN's
and SDPA's, and PyTorch's packed kernels round activations to bf16 at prefill, so differences of
1e-6 upstream become one-ulp flips; greedy decoding then parts at a near-tie (bf16 at token 19).
For those the test feeds transformers' tokens to the runtime (teacher forcing) and compares each
step's logits and their argmax.
"""

import copy

import pytest
import torch

import memfit
from memfit.runtime import Engine

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo-runtime")]

NEW = 64
PROMPT = "The history of the printing press begins"


def _hf(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0].float()


def _runtime_logits(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    engine = Engine(model, compile=False)
    decoder, cache = engine.decoder, engine.cache_for(1, len(ids) + NEW)
    pad = torch.zeros(1, dtype=torch.long)
    logits = [decoder.forward(torch.tensor([ids]), torch.arange(len(ids)), pad, cache)[0]]
    for i, token in enumerate(tokens[:-1]):
        logits.append(decoder.forward(torch.tensor([[token]]), torch.tensor([len(ids) + i]), pad, cache)[0])
    return torch.stack(logits)


@pytest.mark.parametrize(("recipe", "tolerance"), [("fp32", 1e-5), ("int8", 1e-2), ("bf16", 5e-2),
                                                   ("int4-g128", 2e-2)])
@torch.inference_mode()
def test_demo_decode_matches_transformers(demo, recipe, tolerance):
    model, tokenizer = demo
    if recipe != "fp32":
        model = memfit.apply(copy.deepcopy(model), recipe)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    hf_tokens, hf_logits = _hf(model, ids)
    streamed = [step.tokens[0] for step in Engine(model, compile=False).stream([ids], NEW)]
    if recipe in ("fp32", "int8"):
        assert streamed == hf_tokens
    else:
        assert streamed[:16] == hf_tokens[:16]
    logits = _runtime_logits(model, ids, hf_tokens)
    relative = (logits - hf_logits).abs().amax(-1) / hf_logits.abs().amax(-1)
    assert relative.max().item() < tolerance
    assert (logits.argmax(-1) == hf_logits.argmax(-1)).sum().item() >= NEW - 2  # near-ties only
