"""The quantized KV cache (kv-int8, kv-int4): bytes, rounding, reads, the runtime, the estimator, the CLI."""

import json

import pytest
import torch

import memfit
from memfit.cli.main import main
from memfit.data import eval_text, token_windows
from memfit.errors import BudgetError
from memfit.evaluate import runtime_perplexity
from memfit.io import save
from memfit.offload import CONTEXT_PROBE, plan_placement
from memfit.profile import profile
from memfit.runtime import Engine, KVFormat
from memfit.runtime.kvcache import GROUP, ChannelQuantized, KVCache, TokenQuantized, cache_bytes_per_layer, quantize
from memfit.runtime.kvcache import dequantize as dequant


@pytest.mark.parametrize(("format", "ratio"), [(KVFormat.INT8, 0.52), (KVFormat.INT4, 0.30)])
def test_a_quantized_cache_holds_what_the_formula_says_and_under_the_ratio(format, ratio):
    layers, batch, kv_heads, length, head_dim = 3, 2, 3, 2048, 64
    cache = KVCache.allocate(layers, batch, kv_heads, length, head_dim, torch.float32, "cpu", format)
    assert cache.nbytes == layers * cache_bytes_per_layer(format, batch, kv_heads, length, head_dim)
    fp16 = KVCache.allocate(layers, batch, kv_heads, length, head_dim, torch.float16, "cpu")
    assert fp16.nbytes == layers * cache_bytes_per_layer(None, batch, kv_heads, length, head_dim)
    assert cache.nbytes <= ratio * fp16.nbytes
    assert (cache.max_len, cache.batch) == (length, batch)


@pytest.mark.parametrize("format", list(KVFormat))
def test_each_value_comes_back_within_half_a_step(format):
    x = torch.randn(4, 3, 10, 64) * torch.linspace(0.1, 30, 64)
    x[0, 0] = x[0, 0].abs() + 5  # groups of one sign
    x[0, 1] = -x[0, 1].abs() - 5
    codes, *scales = quantize(x, format)
    back = dequant(codes, scales[0], format, torch.float32, scales[1] if len(scales) > 1 else None)
    step = scales[0].float()
    # int4's integer zero point may move the grid by up to half a step against the range's ends
    assert ((back - x).abs() <= step * (0.501 if format is KVFormat.INT8 else 1.001)).all()
    assert codes.shape[-1] == (64 if format is KVFormat.INT8 else 32)


def test_keys_written_a_column_at_a_time_read_as_a_prefill_of_them_does():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3 * GROUP + 5, 64) * torch.linspace(0.5, 8, 64)
    length = x.shape[2]
    stepwise, prefilled = ChannelQuantized((1, 2, 4 * GROUP, 64), "cpu"), ChannelQuantized((1, 2, 4 * GROUP, 64), "cpu")
    for column in range(length):
        stepwise.write(torch.tensor([column]), x[:, :, column:column + 1])
    prefilled.write(torch.arange(length), x)
    last = torch.tensor([length - 1])
    a, b = stepwise.read(torch.float32, last)[:, :, :length], prefilled.read(torch.float32, last)[:, :, :length]
    # whole groups: 4-bit codes per channel (within half a step); the newest group: the int8 residual
    for group in range(3):
        cols = slice(group * GROUP, (group + 1) * GROUP)
        step = (x[:, :, cols].amax(2) - x[:, :, cols].amin(2)) / 15
        residual_error = x[:, :, cols].abs().amax(-1, keepdim=True) / 254  # the int8 copy they were quantized from
        assert ((a[:, :, cols] - x[:, :, cols]).abs() <= step[:, :, None] * 0.51 + 2 * residual_error).all()
        assert ((b[:, :, cols] - x[:, :, cols]).abs() <= step[:, :, None] * 0.51 + 1e-6).all()
    newest = slice(3 * GROUP, length)
    assert torch.allclose(a[:, :, newest], b[:, :, newest])
    bound = x[:, :, newest].abs().amax(-1, keepdim=True) / 254 + 1e-6  # int8, per token
    assert ((a[:, :, newest] - x[:, :, newest]).abs() <= bound).all()
    with pytest.raises(ValueError, match="not at a multiple of"):
        prefilled.write(torch.arange(5, 9), x[:, :, :4])


@pytest.mark.parametrize("format", list(KVFormat))
def test_the_runtime_decodes_from_a_quantized_cache_close_to_the_full_one(make_tiny, format):
    model, _ = make_tiny("tiny-llama")
    prompt = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    full, quantized = Engine(model, compile=False), Engine(model, compile=False, kv_format=format)
    assert quantized.native_step is None  # the native step keeps its cache in the model's dtype
    pad = torch.zeros(2, dtype=torch.long)
    logits = []
    for engine in (full, quantized):
        cache = engine.cache_for(2, 48)
        engine.decoder.forward(prompt, torch.arange(40), pad, cache)
        logits.append(engine.decoder.forward(prompt[:, -1:], torch.tensor([40]), pad, cache))
    assert isinstance(quantized.cache_for(2, 48).values[0], TokenQuantized)
    assert quantized.cache_bytes < full.cache_bytes / (3 if format is KVFormat.INT8 else 5)  # fp32 model
    error = (logits[1] - logits[0]).norm() / logits[0].norm()
    assert error < (0.01 if format is KVFormat.INT8 else 0.1)
    tokens = [step.tokens for step in quantized.stream([[5, 6, 7]], 6)]
    assert len(tokens) == 6 and all(t[0] is not None for t in tokens)


@pytest.mark.parametrize("token", ["kv-int8", "kv-int4"])
def test_the_estimator_predicts_the_quantized_cache_the_runtime_holds(make_tiny, token):
    model, _ = make_tiny("tiny-llama")
    workload = memfit.Workload(mode=memfit.Mode.GENERATE, batch_size=2, seq_len=64, new_tokens=64)
    plan = memfit.Plan.parse(token)
    predicted = memfit.estimate(model, plan, workload)
    measured = profile(model, workload, plan.run)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = config.num_hidden_layers * cache_bytes_per_layer(plan.run.kv_cache, 2, config.num_key_value_heads,
                                                                256, head_dim)  # rounded up to 256 columns
    assert predicted.by_category["kv_cache"] == measured.by_category["kv_cache"] == expected
    assert predicted.peak_bytes == measured.peak_bytes


def test_a_budget_says_how_long_a_context_it_holds_and_that_length_fits(make_tiny, tmp_path):
    from memfit.io import skeleton, stored_tensors

    model, tokenizer = make_tiny("tiny-llama")
    save(model, tokenizer, tmp_path / "m")
    stored = stored_tensors(tmp_path / "m")
    meta = skeleton(tmp_path / "m")
    weights = sum(t.nbytes for t in stored.values())
    for format in (None, KVFormat.INT4):
        placement = plan_placement(meta, stored, weights * 2, prompt_tokens=16, new_tokens=16, kv_format=format)
        context = placement.context_tokens
        assert f"up to {context:,} tokens" in placement.describe()
        # the predicted length fits with the same layers resident; a probe's length more does not
        plan_placement(meta, stored, weights * 2, prompt_tokens=16, new_tokens=context - 16,
                       resident_layers=len(placement.resident_layers), kv_format=format)
        with pytest.raises(BudgetError):
            plan_placement(meta, stored, weights * 2, prompt_tokens=16, new_tokens=context - 16 + CONTEXT_PROBE,
                           resident_layers=len(placement.resident_layers), kv_format=format)


@pytest.mark.slow
def test_on_the_demo_a_quarter_of_its_bytes_holds_a_longer_context_with_a_quantized_cache():
    from memfit.io import skeleton, stored_tensors

    stored = stored_tensors("demo")
    budget = sum(t.nbytes for t in stored.values()) // 4
    contexts = [plan_placement(skeleton("demo"), stored, budget, prompt_tokens=8, new_tokens=24,
                               kv_format=format).context_tokens for format in (None, KVFormat.INT8, KVFormat.INT4)]
    assert contexts[0] * 2.5 < contexts[1] and contexts[1] * 1.4 < contexts[2]  # about 217, 640 and 1,010 tokens


def test_generate_and_estimate_take_the_kv_cache(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "4",
                 "--kv-cache", "int4", "--no-compile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["decode_step"] == "eager" and out["new_tokens"] == 4
    assert out["kv_cache_bytes"] > 0
    assert main(["estimate", "--model", "tiny-llama", "--mode", "generate", "--seq", "64", "--new-tokens", "64",
                 "--recipe", "kv-int8", "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["by_category"]["kv_cache"]
    assert main(["estimate", "--model", "tiny-llama", "--mode", "generate", "--seq", "64", "--new-tokens", "64",
                 "--json"]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["by_category"]["kv_cache"]
    assert quantized < full / 3  # an fp32 cache against int8 codes and their scales
    assert main(["eval", "--model", "tiny-llama", "--kv-cache", "int4", "--tokens", "1024", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["kv_cache"] == "kv-int4" and scored["eval_tokens"] == 1024 and scored["perplexity"] > 1
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--kv-cache", "int2"])
    assert exit.value.code == 2 and "invalid choice: 'int2'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_perplexity_with_a_quantized_cache(demo):
    model, tokenizer = demo
    window = token_windows(tokenizer, eval_text(), 2048, 2048)
    full = runtime_perplexity(Engine(model, compile=False, native=False), window)
    int8 = runtime_perplexity(Engine(model, compile=False, native=False, kv_format=KVFormat.INT8), window)
    int4 = runtime_perplexity(Engine(model, compile=False, native=False, kv_format=KVFormat.INT4), window)
    assert full < int8 <= full * 1.005
    assert full < int4 <= full * 1.03
