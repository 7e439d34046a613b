"""The native decode step (one call of memfit's C library per token) against the PyTorch step it
replaces: the same logits and cache contents step after step, in every format it runs, with left
padding, biases (qwen2), pruned shapes and a sliding window; the formats it does not run say why."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.runtime import Engine
from memfit.runtime.engine import _step
from memfit.runtime.native_step import NativeStep

PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [27, 18, 28]]


def _calibrated(model, recipe: str):
    calibration = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))
    memfit.apply(model, recipe, memfit.Context(calibration=calibration))
    return model


@torch.inference_mode()
def _steps(model, steps: int = 24) -> tuple[list[torch.Tensor], list[torch.Tensor], object, object]:
    """Teacher-forced logits of the eager and the native step from the same prefill, and both caches."""
    engine = Engine(model, compile=False)
    assert engine.native_step is not None, NativeStep.unsupported(engine.decoder)
    decoder, longest = engine.decoder, max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
    pad = torch.tensor([longest - len(p) for p in PROMPTS])
    caches = [decoder.new_cache(len(PROMPTS), 64) for _ in range(2)]
    for cache in caches:
        decoder.forward(ids, torch.arange(longest), pad, cache)
    token, eager, native = torch.tensor([[11], [12]]), [], []
    for step in range(steps):
        column = torch.tensor([longest + step])
        eager.append(_step(decoder, token, column, pad, caches[0]))
        native.append(engine.native_step(decoder, token, column, pad, caches[1]).clone())  # a reused buffer
        token = eager[-1].argmax(-1, keepdim=True)
    return eager, native, caches[0], caches[1]


FORMATS = ["none", "bf16", "int8", "int4-g32", "int4-g32,bf16", "w8a8", "int8,bf16", "prune-mlp-25",
           "prune-heads-50", "drop-layers-1"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("recipe", FORMATS)
def test_native_step_computes_the_pytorch_steps_logits_and_cache(make_tiny, name, recipe):
    model = _calibrated(make_tiny(name)[0], recipe)
    eager, native, eager_cache, native_cache = _steps(model)
    # float32: the same sums in another order; bf16: the same roundings (identical on this machine)
    tolerance = dict(rtol=2e-2, atol=2e-2) if "bf16" in recipe else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(eager, native, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape
        torch.testing.assert_close(b, a, **tolerance)
    for a, b in zip(eager_cache.tensors(), native_cache.tensors(), strict=True):
        torch.testing.assert_close(b, a, **tolerance)
    assert torch.equal(torch.stack(native).argmax(-1), torch.stack(eager).argmax(-1))


def test_native_step_reads_the_plain_int4_layout(make_tiny, monkeypatch):
    """With no CPU kernel layout (another CPU), int4 weights stay in the plain layout the step reads
    with bf16 dot products."""
    from memfit.strategies.quantize import kernels
    from memfit.strategies.quantize.packed import Int4Linear

    monkeypatch.setattr(kernels, "cpu_int4_layout", lambda: None)
    model = _calibrated(make_tiny("tiny-llama")[0], "int4-g32")
    assert all(m.layout == kernels.PLAIN for m in model.modules() if isinstance(m, Int4Linear))
    eager, native, *_ = _steps(model)
    for a, b in zip(eager, native, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_native_step_keeps_to_a_sliding_window(make_tiny):
    model, _ = make_tiny("tiny-qwen2")
    model.config.use_sliding_window, model.config.sliding_window = True, 6
    eager, native, *_ = _steps(model, steps=12)
    for a, b in zip(eager, native, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    full, _ = make_tiny("tiny-qwen2")
    assert not torch.allclose(_steps(full, steps=12)[1][-1], native[-1])  # the window changed the result


@pytest.mark.parametrize(("recipe", "reason"), [
    ("fp8", "layer 0 q_proj is a memfit.strategies.quantize.packed.Fp8Linear"),
    ("lora-4", "layer 0 q_proj is a peft.tuners.lora.layer.Linear"),
    ("lowrank-all-50", "layer 0 q_proj is a memfit.strategies.lowrank.LowRankLinear"),
    ("prune-50-magnitude", "layer 0 q_proj is a memfit.strategies.prune.packed.SparseLinear"),
])
def test_formats_the_native_step_does_not_run_are_named(make_tiny, recipe, reason):
    model = _calibrated(make_tiny("tiny-llama")[0], recipe)
    engine = Engine(model, compile=False)
    assert engine.native_step is None
    assert NativeStep.unsupported(engine.decoder) == reason


def test_hooks_and_autocast_take_the_pytorch_step(make_tiny):
    model, _ = make_tiny("tiny-llama")
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: None)
    assert NativeStep.unsupported(Engine(model, compile=False).decoder) == \
        "layer 1 down_proj has hooks or a patched forward"
    handle.remove()
    engine = Engine(model, compile=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache then holds the autocast dtype
        assert engine._native() is None
    list(engine.stream([PROMPTS[0]], 3))
    assert engine.step_kind == "native"


def test_without_the_c_library_the_pytorch_step_decodes(make_tiny, monkeypatch):
    from memfit import native

    monkeypatch.setattr(native, "available", lambda: False)
    engine = Engine(make_tiny("tiny-llama")[0], compile=False)
    assert engine.native_step is None and engine.step_kind == "eager"


@pytest.mark.parametrize("recipe", ["bf16", "int4-g32"])
def test_a_wider_model_gives_the_pytorch_steps_logits(recipe):
    """Rows enough that the two threads' shares of each matmul overlap in time (the tiny models'
    finish almost at once): a thread writing its outputs over an input another still reads shows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=2048, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    model = _calibrated(AutoModelForCausalLM.from_config(config).eval(), recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs one thread per worker; a race needs two
    try:
        eager, native, *_ = _steps(model, steps=12)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(eager, native, strict=True):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)


def test_greedy_native_decoding_takes_several_steps_per_library_call(make_tiny, monkeypatch):
    from memfit.runtime.engine import GREEDY_CHUNK

    model, _ = make_tiny("tiny-qwen2")
    engine = Engine(model, compile=False)
    chunks = []
    greedy = NativeStep.greedy
    monkeypatch.setattr(NativeStep, "greedy", lambda self, *args: chunks.append(args[-1]) or greedy(self, *args))
    chunked = [step.tokens for step in engine.stream(PROMPTS, 20)]
    assert chunks == [GREEDY_CHUNK, GREEDY_CHUNK, 19 - 2 * GREEDY_CHUNK]  # the first token is the prefill's
    # the same tokens as the native step called once per token
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    pad = torch.tensor([longest - len(p) for p in PROMPTS])
    cache = engine.cache_for(len(PROMPTS), longest + 20)
    with torch.inference_mode():
        one_by_one = [t.tolist() for t in engine.tokens(ids, pad, cache, 20, step=lambda *a: engine.native_step(*a))]
    assert chunked == one_by_one
