"""memfit's decode runtime on tiny models: the same tokens as transformers' greedy generate in every
format memfit saves, through the native step (memfit's C library) and the PyTorch step, a static
cache written in place, batches with left padding, sampling, stop strings, the compiled step and
its eager fallback, and `memfit generate`'s contract."""

from __future__ import annotations

import json

import pytest
import torch

import memfit
from memfit.cli.main import main
from memfit.runtime import Engine, Sampling
from memfit.runtime import engine as engine_module
from memfit.runtime.sampling import Sampler

NEW = 64


def _prompt(length: int = 12, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(model, prompt: list[int], new: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def _runtime(model, prompts, new: int = NEW, compile: bool = False, native: bool = True,
             **sampling) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in prompts]
    for step in Engine(model, compile=compile, native=native).stream(prompts, new, Sampling(**sampling)):
        for row, token in enumerate(step.tokens):
            if token is not None:
                rows[row].append(token)
    return rows


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_transformers_generate(make_tiny, name, dtype):
    model, _ = make_tiny(name)
    model.to(dtype)
    prompt = _prompt()
    expected = _hf_greedy(model, prompt)
    assert _runtime(model, [prompt])[0] == expected  # the native step
    assert _runtime(model, [prompt], native=False)[0] == expected  # the PyTorch step


# The formats the native step runs; the others decode with the PyTorch step.
NATIVE = ["int8", "int4-g32", "w8a8", "prune-mlp-25", "prune-heads-50", "drop-layers-1", "bf16,int8"]
RECIPES = [*NATIVE, "fp8", "prune-50-magnitude", "prune-2of4-magnitude,int8", "lowrank-all-50", "lora-4",
           "int4-g32,lora-4"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_saved_format_decodes_the_same_tokens_as_transformers(make_tiny, recipe, tmp_path):
    """Applied, saved and loaded back as a user would run it: the runtime's greedy tokens, through
    the step `memfit generate` takes for the format and through the eager PyTorch step, equal
    transformers' generate on the same loaded model."""
    model, tokenizer = make_tiny("tiny-llama")
    calibration = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))
    memfit.apply(model, recipe, memfit.Context(calibration=calibration))
    if "lora" in recipe:  # trained adapters are not zero: give B values so LoRA changes the output
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    memfit.save(model, tokenizer, tmp_path / "m")
    loaded, _ = memfit.load(tmp_path / "m")
    prompt = _prompt()
    expected = _hf_greedy(loaded, prompt)
    engine = Engine(loaded, compile=False)
    assert [s.tokens[0] for s in engine.stream([prompt], NEW)] == expected, recipe
    assert engine.step_kind == ("native" if recipe in NATIVE else "eager")
    assert _runtime(loaded, [prompt], native=False)[0] == expected, recipe


@pytest.mark.xdist_group("inductor")  # one worker pays inductor's first compile (about 10 s cold)
def test_compiled_step_gives_the_eager_tokens_and_is_reused(make_tiny):
    model, _ = make_tiny("tiny-llama")
    prompt = _prompt()
    engine = Engine(model, compile=True, native=False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens = [s.tokens[0] for s in engine.stream([prompt], NEW)]
    assert engine.compiled
    assert tokens == _hf_greedy(model, prompt)
    # the warm-up before the prefill compiled the one graph every decode step then ran
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == before + 1
    # a second generation of the same shapes reuses the compiled step (no recompilation)
    assert [s.tokens[0] for s in engine.stream([prompt], NEW)] == tokens
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_a_failing_compiler_falls_back_to_eager_and_says_so_once(make_tiny, monkeypatch, capsys):
    model, _ = make_tiny("tiny-llama")

    def broken(*args):
        def fail(*args):
            raise RuntimeError("no C++ compiler\nsecond line")
        return fail

    monkeypatch.setattr(engine_module, "compiled_step", broken)
    prompt = _prompt()
    engine = Engine(model, compile=True, native=False)
    assert [s.tokens[0] for s in engine.stream([prompt], 16)] == _hf_greedy(model, prompt, 16)
    assert [s.tokens[0] for s in engine.stream([prompt], 16)]  # no second message
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["memfit: compiling the decode step failed (RuntimeError: no C++ compiler); decoding eagerly"]
    assert not engine.compiled


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_the_cache_is_preallocated_and_written_in_place(make_tiny, native):
    model, _ = make_tiny("tiny-llama")
    engine = Engine(model, compile=False, native=native)
    steps = engine.stream([_prompt()], 40)
    next(steps)
    cache = engine._cache
    pointers = [t.data_ptr() for t in cache.tensors()]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert cache.max_len == 256  # 12 + 40 rounded up to the cache step
    assert cache.nbytes == 2 * config.num_hidden_layers * 1 * config.num_key_value_heads * 256 * head_dim * 4
    for _ in steps:
        pass
    assert [t.data_ptr() for t in engine._cache.tensors()] == pointers
    assert engine._cache is cache
    # columns 0..51 hold keys; nothing was written past the last decode step's column (12 + 39 - 1)
    assert cache.keys[0][0, :, :51].abs().sum() > 0 and cache.keys[0][0, :, 51:].abs().sum() == 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_a_left_padded_batch_gives_each_row_its_own_tokens(make_tiny, native):
    model, _ = make_tiny("tiny-qwen2")
    prompts = [_prompt(12, 1), _prompt(5, 2), _prompt(9, 3)]
    batched = _runtime(model, prompts, 24, native=native)
    assert batched == [_runtime(model, [p], 24, native=native)[0] for p in prompts]
    assert batched[1] == _hf_greedy(model, prompts[1], 24)


def test_eos_ends_a_row_and_the_others_go_on(make_tiny):
    model, _ = make_tiny("tiny-llama")
    prompts = [_prompt(12, 1), _prompt(7, 5)]
    free = _runtime(model, prompts, 20)
    eos = free[0][5]
    assert eos not in free[1]
    rows = [[], []]
    for step in Engine(model, compile=False).stream(prompts, 20, eos=[eos]):
        for row, token in enumerate(step.tokens):
            if token is not None:
                rows[row].append(token)
    assert rows[0] == free[0][: free[0].index(eos) + 1]
    assert rows[1] == free[1]


def test_sampling_is_seeded_and_its_limits_mean_what_they_say(make_tiny):
    model, _ = make_tiny("tiny-llama")
    prompt = [_prompt()]
    greedy = _runtime(model, prompt, 32)
    a = _runtime(model, prompt, 32, temperature=1.0, seed=7)
    assert a == _runtime(model, prompt, 32, temperature=1.0, seed=7)
    assert a != _runtime(model, prompt, 32, temperature=1.0, seed=8)
    assert a != greedy
    assert _runtime(model, prompt, 32, temperature=1.5, top_k=1, seed=7) == greedy
    assert _runtime(model, prompt, 32, temperature=1.5, top_p=1e-6, seed=7) == greedy


def test_sampling_transforms_match_transformers_logits_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    seen_ids = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 49]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, seen_ids, True)
    ours = Sampling(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    expected = logits
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(10),
                      TopPLogitsWarper(0.8)):
        expected = processor(seen_ids, expected)
    draws = torch.stack([Sampler(Sampling(**{**vars(ours), "seed": s}))(logits, seen) for s in range(300)])
    allowed = expected.isfinite()
    assert all(allowed[row, draws[:, row]].all() for row in range(2))  # never outside HF's support
    assert (allowed.sum(-1) < 10).all()  # top-p cut inside top-k
    for row in range(2):  # every token HF keeps is drawn (p >= 1/15 each after the cuts)
        assert set(draws[:, row].tolist()) == set(allowed[row].nonzero()[:, 0].tolist())


def test_stop_strings_cut_the_text_and_streamed_pieces_add_up(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    free = memfit.generate(model, tokenizer, "hello", max_new_tokens=30, compile=False)
    assert free.stopped == "length" and free.new_tokens == 30
    stop = free.text[10:13]
    cut = memfit.generate(model, tokenizer, "hello", max_new_tokens=30, stop=[stop], compile=False)
    assert cut.stopped == "stop" and cut.text == free.text[: free.text.index(stop)]
    pieces = list(memfit.runtime.stream(model, tokenizer, "hello", max_new_tokens=30, stop=[stop],
                                        engine=Engine(model, compile=False)))
    assert "".join(pieces) == cut.text


def test_generate_json_contract(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "12",
                 "--no-compile", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    assert set(data) == {"text", "prompt_tokens", "new_tokens", "ttft_s", "decode_tokens_per_s", "weight_bytes",
                         "kv_cache_bytes", "tokenizer_rss_bytes", "baseline_rss_bytes", "peak_rss_bytes",
                         "decode_step", "compiled", "compile_s", "stopped"}
    assert out[0] == data["text"] and data["new_tokens"] == 12 and data["prompt_tokens"] == 5
    assert data["weight_bytes"] == 361_792 and data["kv_cache_bytes"] == 2 * 2 * 2 * 256 * 16 * 4
    assert data["decode_step"] == "native" and data["compiled"] is False
    assert data["peak_rss_bytes"] >= data["baseline_rss_bytes"] > 0
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "12", "--no-native",
                 "--no-compile", "--json"]) == 0
    pytorch = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pytorch["decode_step"] == "eager" and pytorch["text"] == data["text"]


def test_ctrl_c_while_streaming_stops_with_exit_130_and_no_traceback(capsys, monkeypatch):
    import memfit.runtime

    def interrupted(*args, **kwargs):
        yield "Once"
        raise KeyboardInterrupt

    monkeypatch.setattr(memfit.runtime, "stream", interrupted)
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hello", "--no-compile"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "Once" and captured.err == "memfit generate: interrupted\n"


@pytest.mark.parametrize(("args", "fragment"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max new tokens must be at least 1"),
    (["--prompt", "hi", "--max-new-tokens", "-3"], "max new tokens must be at least 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt", "x" * 1100], "the model's context is 1024"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
])
def test_bad_generate_input_is_one_line_and_exit_2(capsys, args, fragment):
    assert main(["generate", "--model", "tiny-llama", "--no-compile", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err


def test_the_int4_operand_lives_as_long_as_an_engine_uses_it(make_tiny):
    """An engine precomputes the CPU int4 kernel's scale/zero operand on each packed Linear and
    drops it when the last engine that uses it is gone."""
    from memfit.strategies.quantize.packed import Int4Linear

    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int4-g32")
    linears = [m for m in model.modules() if isinstance(m, Int4Linear) and m.prepare_for_runtime()]
    for m in linears:
        m.release_runtime()
    if not linears:
        pytest.skip("this CPU's PyTorch has no int4 kernel layout")
    assert Engine(model, compile=False).workspace_bytes == 0  # the native step reads the weights as they are
    first, second = Engine(model, compile=False, native=False), Engine(model, compile=False, native=False)
    assert first.workspace_bytes == second.workspace_bytes > 0
    del first
    assert all("_scale_zero" in m.__dict__ for m in linears)
    del second
    assert not any("_scale_zero" in m.__dict__ for m in linears)
