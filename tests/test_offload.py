"""Models larger than memory: streamed decoder layers give the same tokens within the budget."""

import gc
import json
import os
import re
import shutil

import pytest
import torch

import memfit
from memfit.cli.main import main
from memfit.errors import BudgetError
from memfit.io import save
from memfit.memory import track, weight_bytes
from memfit.offload import SLACK, load_streamed
from memfit.plan import Plan, apply
from memfit.runtime import Engine
from memfit.workload import Context

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4, 5]]
NEW = 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name, recipe)`` -> a directory written by memfit.save (cached per module)."""
    made = {}

    def make(name: str = "tiny-llama", recipe: str = "none"):
        if (name, recipe) not in made:
            torch.manual_seed(0)
            model, tokenizer = memfit.load(name)
            apply(model, Plan.parse(recipe), Context())
            out = tmp_path_factory.mktemp("saved") / f"{name}-{recipe}"
            save(model, tokenizer, out)
            made[name, recipe] = out
        return made[name, recipe]

    return make


def smallest_budget(path, **kwargs) -> int:
    """The smallest budget, as the refusal of a 1-byte one names it."""
    with pytest.raises(BudgetError, match=r"pass --max-memory \d+ or more") as info:
        load_streamed(path, 1, **kwargs)
    return int(re.search(r"\((\d+) bytes", str(info.value)).group(1))


def streamed_tokens(path, budget, *, native=True, ahead=64, resident_layers=None):
    model, streamed, placement = load_streamed(path, budget, batch=len(PROMPTS), prompt_tokens=max(map(len, PROMPTS)),
                                               new_tokens=NEW, ahead=ahead, count_rss=False,
                                               resident_layers=resident_layers)
    engine = Engine(model, compile=False, native=native, streamed=streamed, cache_step=1)
    with track(model) as tracker:
        tracker.hold(engine.cache_for(len(PROMPTS), max(map(len, PROMPTS)) + NEW).tensors())
        tokens = [step.tokens for step in engine.stream(PROMPTS, NEW)]
    return tokens, tracker.peak_bytes, model, streamed, placement, engine


@pytest.mark.parametrize(("name", "recipe"), [("tiny-llama", "none"), ("tiny-llama", "int8"),
                                              ("tiny-llama", "int4-g32"), ("tiny-qwen2", "none"),
                                              ("tiny-qwen2", "bf16")])
def test_every_layer_streamed_gives_the_resident_models_tokens(saved, name, recipe):
    path = saved(name, recipe)
    want = [step.tokens for step in Engine(memfit.load(path)[0], compile=False).stream(PROMPTS, NEW)]
    budget = smallest_budget(path, batch=len(PROMPTS), prompt_tokens=6, new_tokens=NEW, count_rss=False,
                             resident_layers=0)
    for native, ahead in ((True, 64), (True, 0), (False, 64), (False, 0)):
        tokens, peak, _, streamed, placement, engine = streamed_tokens(path, budget, native=native, ahead=ahead,
                                                                       resident_layers=0)
        assert placement.resident_layers == [] and placement.streamed_layers == [0, 1]
        assert engine.step_kind == ("native" if native else "eager")
        assert tokens == want, (native, ahead)
        assert peak <= budget, (native, ahead)
        read, _ = streamed.stats()
        assert read >= NEW * placement.streamed_bytes  # every token read every streamed layer


def test_a_layer_kept_resident_is_read_once_and_the_held_bytes_are_the_predicted_ones(saved):
    path = saved("tiny-llama", "none")
    budget = smallest_budget(path, batch=2, prompt_tokens=6, new_tokens=NEW, count_rss=False, resident_layers=1)
    layer = sum(t.numel() * t.element_size() for t in memfit.load(path)[0].model.layers[1].state_dict().values())
    want = [step.tokens for step in Engine(memfit.load(path)[0], compile=False).stream(PROMPTS, NEW)]
    tokens, peak, model, streamed, placement, _ = streamed_tokens(path, budget, resident_layers=1)
    assert tokens == want
    assert placement.resident_layers == [0] and placement.streamed_layers == [1]
    assert placement.streamed_bytes == layer
    # what the model holds: its resident weights and the ring its streamed layer's tensors are views into
    rotary = sum(b.nbytes for b in model.model.rotary_emb.buffers())  # computed, not in the file
    assert weight_bytes(model) == placement.resident_bytes + placement.ring_bytes + rotary
    assert streamed.ring.nbytes == placement.ring_bytes
    # the prediction leaves out what the caller's loop holds (its token tensors): the slack covers it
    assert placement.predicted_peak_bytes <= peak <= placement.predicted_peak_bytes + SLACK <= budget
    # left to choose, the same budget keeps at least that layer resident
    _, _, free = load_streamed(path, budget, batch=2, prompt_tokens=6, new_tokens=NEW, count_rss=False)
    assert len(free.resident_layers) >= 1


def test_a_short_read_is_an_error_not_garbage(saved, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved("tiny-llama", "none"), path)
    budget = smallest_budget(path, batch=2, prompt_tokens=6, new_tokens=NEW, count_rss=False)
    model, streamed, _ = load_streamed(path, budget, batch=2, prompt_tokens=6, new_tokens=NEW, ahead=0,
                                       count_rss=False)
    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(OSError, match="reading streamed weights failed"):
        list(Engine(model, compile=False, streamed=streamed, cache_step=1).stream(PROMPTS, NEW))


def test_generate_max_memory_json_and_refusal(saved, capsys):
    path = str(saved("tiny-llama", "none"))
    args = ["generate", "--model", path, "--prompt", "hello there", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--max-memory", "1KB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    smallest = int(re.search(r"pass --max-memory (\d+) or more", err[0]).group(1))
    assert main([*args, "--max-memory", str(smallest)]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["text"] == full["text"]
    assert data["max_memory_bytes"] == smallest
    assert 0 < data["tracked_peak_bytes"] <= smallest
    assert data["placement"]["streamed_layers"] == [0, 1]
    assert data["bytes_read_per_token"] == data["placement"]["streamed_bytes"] > 0


@pytest.mark.slow
def test_demo_fp32_at_a_quarter_of_its_bytes_gives_the_same_tokens(demo):
    model, _ = demo
    ids = [[1, 9690, 2115, 253, 1247]]  # "Once upon a time" with BOS
    want = [step.tokens for step in Engine(model).stream(ids, 16)]
    budget = weight_bytes(model) // 4
    streamed_model, streamed, placement = load_streamed("demo", budget, prompt_tokens=5, new_tokens=16,
                                                        count_rss=False)
    engine = Engine(streamed_model, streamed=streamed, cache_step=1)
    with track(streamed_model) as tracker:
        tracker.hold(engine.cache_for(1, 5 + 16).tensors())
        tokens = [step.tokens for step in engine.stream(ids, 16)]
    assert tokens == want
    assert placement.resident_layers == [] and len(placement.streamed_layers) == 30
    assert tracker.peak_bytes <= budget


def test_reads_come_from_the_steps_threads_when_the_file_is_cached_else_from_a_reader(saved, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved("tiny-llama", "none"), path)
    kwargs = dict(batch=2, prompt_tokens=6, new_tokens=NEW, count_rss=False, resident_layers=0)
    budget = smallest_budget(path, **kwargs)
    weights = path / "model.safetensors"
    weights.read_bytes()  # in the page cache: reads would be copies, which the step's threads make faster
    _, streamed, placement = load_streamed(path, budget, **kwargs)
    assert placement.cached_fraction >= 0.9 and not placement.read_ahead and streamed.ahead == 0
    streamed.close()
    gc.collect()  # nothing may map the file's pages, or the kernel keeps them
    fd = os.open(weights, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    _, streamed, placement = load_streamed(path, budget, **kwargs)
    if placement.cached_fraction >= 0.9:
        pytest.skip("this file system keeps the file cached (tmpfs)")
    assert placement.read_ahead and streamed.ahead > 0


def test_generate_batch_decodes_each_line_as_its_own_run_would(saved, tmp_path, capsys):
    path = str(saved("tiny-llama", "none"))
    lines = ["hello there", "a much longer prompt than the first one"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n\n")
    alone = []
    for line in lines:
        assert main(["generate", "--model", path, "--prompt", line, "--max-new-tokens", "8", "--json"]) == 0
        alone.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    args = ["generate", "--model", path, "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "8",
            "--batch", "2", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["texts"] == alone and data["batch"] == 2 and data["prompts"] == 2
    assert data["batch_decode_tokens_per_s"] > 0
    assert main([*args, "--max-memory", "1KB"]) == 2
    smallest = re.search(r"pass --max-memory (\d+) or more", capsys.readouterr().err).group(1)
    assert main([*args, "--max-memory", smallest]) == 0  # the smallest budget for two rows: layers streamed
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["texts"] == alone and data["placement"]["streamed_layers"]
    assert main([*args[:-2], "0", "--json"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err


def test_eval_max_memory_scores_as_the_resident_runtime_does_within_the_budget(saved, capsys):
    from memfit.cli.eval import STREAMED_CHUNK
    from memfit.data import eval_text, token_windows
    from memfit.evaluate import WINDOW, runtime_perplexity

    path = saved("tiny-llama", "none")
    budget = smallest_budget(path, prompt_tokens=WINDOW, new_tokens=0, eval_chunk=STREAMED_CHUNK, count_rss=False)
    assert main(["eval", "--model", str(path), "--max-memory", str(budget + (64 << 10)), "--tokens", "1024",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["placement"]["streamed_layers"] and out["tracked_peak_bytes"] <= out["max_memory_bytes"]
    model, tokenizer = memfit.load(path)
    windows = token_windows(tokenizer, eval_text(), 1024, WINDOW)
    resident = runtime_perplexity(Engine(model, compile=False, native=False, cache_step=1), windows,
                                  chunk=STREAMED_CHUNK)
    assert out["perplexity"] == resident and out["eval_tokens"] == 1024
    assert main(["eval", "--model", str(path), "--max-memory", "1", "--tokens", "1024"]) == 2
    assert "pass --max-memory" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["none", "int8"])
def test_without_the_page_cache_every_pass_reads_the_disk_and_gives_the_same_tokens(saved, recipe):
    from memfit.runtime.streamed import StreamedWeights

    path = saved("tiny-llama", recipe)
    budget = smallest_budget(path, batch=len(PROMPTS), prompt_tokens=max(map(len, PROMPTS)), new_tokens=NEW,
                             count_rss=False, page_cache=False, resident_layers=0)
    os.sync()  # written pages are dirty until written back, and only clean ones can be dropped
    fd = os.open(path / "model.safetensors", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a cold start: then only the run's reads could cache pages
    os.close(fd)
    try:  # the file system of the test's directory may refuse O_DIRECT; the reads then drop their pages
        os.close(os.open(path / "model.safetensors", os.O_RDONLY | os.O_DIRECT))
        direct = True
    except OSError:
        direct = False
    model, streamed, placement = load_streamed(path, budget, batch=len(PROMPTS), prompt_tokens=max(map(len, PROMPTS)),
                                               new_tokens=NEW, count_rss=False, page_cache=False, resident_layers=0)
    assert placement.read_ahead and streamed.ahead > 0  # disk reads wait: read ahead by default
    assert streamed.direct == direct
    # fp32 tensors sit in the ring at their offset within a page of the file, for O_DIRECT; int8 ones
    # at an offset that is not a multiple of 64 in the file go through the page cache, 64-byte aligned
    slots = [slot for unit in streamed.units for slot in unit.slots]
    for slot in slots:
        at = slot.module._parameters.get(slot.attr, slot.module._buffers.get(slot.attr)).data_ptr()
        page_placed = (at - slot.stored.offset) % 4096 == 0
        assert page_placed == (slot.stored.dtype.is_floating_point or slot.stored.offset % 64 == 0), slot.attr
        assert page_placed or at % 64 == 0
    engine = Engine(model, compile=False, streamed=streamed, cache_step=1)
    tokens = [step.tokens for step in engine.stream(PROMPTS, NEW)]
    assert StreamedWeights.cached_fraction(streamed.units) < 0.5  # the reader's last few units at most
    assert streamed.stats()[0] >= NEW * placement.streamed_bytes  # every token read its layers again
    assert tokens == streamed_tokens(path, 1 << 40)[0]  # the resident model's (read after: it maps the file)
