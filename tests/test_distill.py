"""Knowledge distillation (`memfit.train.distill`, `memfit distill`): the chunked loss, runs, resume, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit.cli.main import main
from memfit.data import calibration_windows
from memfit.errors import CheckpointError, RecipeError
from memfit.train.distill import (
    DistillConfig,
    Distiller,
    Divergence,
    check_pair,
    distill,
    divergence,
    reference_loss,
    split_student,
    with_rest,
)
from memfit.train.teacher_cache import TeacherCache


def _perturbed(model, scale=0.05, seed=3):
    """A copy of ``model`` with noise on every weight: a student that differs from its teacher."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return student


@pytest.mark.parametrize("kind", list(Divergence))
def test_divergences_follow_their_definitions(kind):
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=generator), torch.randn(5, 11, generator=generator)
    p, q = s.softmax(-1).double(), t.softmax(-1).double()  # student, teacher
    kl = lambda a, b: (a * (a / b).log()).sum()
    m = 0.5 * q + 0.5 * p
    expected = {Divergence.KL: kl(q, p), Divergence.REVERSE_KL: kl(p, q),
                Divergence.JSD: 0.5 * kl(q, m) + 0.5 * kl(p, m)}[kind]
    assert divergence(s, t, kind).item() == pytest.approx(expected.item(), rel=1e-5)
    assert divergence(t, t, kind).item() == pytest.approx(0.0, abs=1e-6)
    if kind is Divergence.JSD:  # bounded by log 2 per row
        assert divergence(s * 50, t * 50, kind).item() <= 5 * math.log(2) + 1e-5


@pytest.mark.parametrize(("kind", "temperature", "alpha"), [
    (Divergence.KL, 1.0, 1.0), (Divergence.KL, 2.0, 0.5), (Divergence.REVERSE_KL, 1.0, 1.0),
    (Divergence.JSD, 1.5, 0.7), (Divergence.KL, 1.0, 0.0),
])
def test_the_chunked_loss_and_its_gradients_equal_the_whole_batch_computation(make_tiny, tokens, kind, temperature,
                                                                             alpha):
    teacher, _ = make_tiny()
    student = _perturbed(teacher)
    teacher.requires_grad_(False)
    config = DistillConfig(kind, temperature, alpha, chunk=7)  # 96 positions: 13 chunks, the last one short

    expected = reference_loss(student(tokens).logits, teacher(tokens).logits, tokens, config)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    loss = Distiller(student, teacher, config)(student, tokens)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(student.get_output_embeddings())  # the head's swap is undone


def test_the_chunked_loss_never_holds_a_whole_batch_of_logits(make_tiny):
    from memfit.memory.tracker import track

    teacher, _ = make_tiny()
    student = _perturbed(teacher)
    teacher.requires_grad_(False)
    ids = torch.randint(0, teacher.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    logits_bytes = ids.numel() * teacher.config.vocab_size * 4
    peaks = {}
    for chunk in (16, 256):  # 256 positions: the whole batch in one chunk
        with track(student) as tracker:
            Distiller(student, teacher, DistillConfig(chunk=chunk))(student, ids).backward()
        peaks[chunk] = tracker.peak_bytes
        student.zero_grad(set_to_none=True)
    # one chunk of 256 holds several [256, V] float32 tensors at once (both models' logits, softmaxes)
    assert peaks[256] - peaks[16] > 2 * logits_bytes * (1 - 16 / 256)


def test_distilling_brings_a_student_closer_to_its_teacher(tmp_path):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    teacher, tokenizer = memfit.load("tiny-llama")
    memfit.save(_perturbed(teacher, scale=0.1), tokenizer, tmp_path / "student")  # another model, same tokenizer

    def gap(model):
        with torch.no_grad():
            return divergence(model(ids).logits.flatten(0, 1), teacher(ids).logits.flatten(0, 1), Divergence.KL).item()

    before, _ = memfit.load(tmp_path / "student")
    result = distill("tiny-llama", tmp_path / "student", steps=30, batch=4, seq=32, lr=3e-3, device="cpu",
                     out=tmp_path / "run")
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert gap(result.model.eval()) < 0.5 * gap(before)
    # the teacher's weights count in the tracked peak, on top of the student's and its optimizer's
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert result.report.peak_bytes > teacher_bytes + 3 * sum(p.numel() * 4 for p in result.model.parameters())
    saved, _ = memfit.load(tmp_path / "run" / "model")
    assert gap(saved) == pytest.approx(gap(result.model), rel=1e-5)


def test_a_student_model_with_another_vocabulary_or_tokenizer_is_refused(make_tiny, tmp_path, capsys):
    teacher, tokenizer = make_tiny()
    student = copy.deepcopy(teacher)
    student.resize_token_embeddings(teacher.config.vocab_size + 8)
    with pytest.raises(RecipeError, match=r"the student's vocabulary has \d+ tokens and the teacher's \d+"):
        check_pair(student, teacher)

    class Renamed:
        def get_vocab(self):
            vocab = dict(tokenizer.get_vocab())
            token = next(iter(vocab))
            vocab[token + "x"] = vocab.pop(token)
            return vocab

    with pytest.raises(RecipeError, match=r"the student's tokenizer differs from the teacher's \(2 token ids differ"):
        check_pair(teacher, teacher, Renamed(), tokenizer)

    memfit.save(student, tokenizer, tmp_path / "wide")
    assert main(["distill", "--teacher", "tiny-llama", "--student", str(tmp_path / "wide"), "--steps", "1",
                 "--batch", "2", "--seq", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit distill: error: the student's vocabulary has") and len(err.splitlines()) == 1


def test_the_student_is_a_recipe_on_the_teacher_or_a_model(tmp_path):
    assert split_student("drop-layers-6", "demo", "adamw-8bit") == ("demo", "drop-layers-6,adamw-8bit")
    assert split_student("int4-g128-gptq,lora-8", "demo", "none") == ("demo", "int4-g128-gptq,lora-8")
    assert split_student("tiny-qwen2", "tiny-llama", "lora-8") == ("tiny-qwen2", "lora-8")
    with pytest.raises(RecipeError, match=r"--student 'drop-layer-6' is neither a recipe \(unknown recipe token"):
        split_student("drop-layer-6", "demo", "none")


@pytest.mark.parametrize(("args", "message"), [
    (["--loss", "kl", "--alpha", "1.5"], "--alpha must be within [0, 1], got 1.5"),
    (["--temperature", "0"], "--temperature must be positive, got 0.0"),
    (["--student", "drop-layer-1"], "--student 'drop-layer-1' is neither a recipe"),
    (["--teacher", "/no/such/model"], "model '/no/such/model' not found"),
    (["--student", "drop-layers-9"], "drop-layers-9 drops 9 of the model's"),
])
def test_distill_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    base = {"--teacher": "tiny-llama", "--student": "drop-layers-1", "--steps": "1", "--batch": "2", "--seq": "16"}
    extra = dict(zip(args[::2], args[1::2], strict=True))
    argv = ["distill", *[x for k, v in {**base, **extra}.items() for x in (k, v)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit distill: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_distill_cli_json_and_resume_to_the_same_losses(tmp_path, capsys):
    args = ["distill", "--teacher", "tiny-llama", "--student", "drop-layers-1", "--batch", "2", "--seq", "16",
            "--loss", "jsd", "--temperature", "2", "--alpha", "0.5", "--json"]
    assert main([*args, "--steps", "6"]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert whole["teacher"] == "tiny-llama" and whole["loss"] == "jsd" and whole["alpha"] == 0.5
    assert whole["temperature"] == 2.0 and whole["recipe"] == "drop-layers-1" and len(whole["losses"]) == 6

    out = str(tmp_path / "run")
    assert main([*args, "--steps", "6", "--out", out, "--save-every", "3"]) == 0
    capsys.readouterr()
    (tmp_path / "run" / "checkpoints" / "step-6").rename(tmp_path / "run" / "checkpoints" / ".step-6.tmp")
    assert main([*args, "--steps", "6", "--out", out, "--resume"]) == 0  # from step 3
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["losses"]
    assert resumed == pytest.approx(whole["losses"], rel=1e-5)
    # a resumed run must be the same distillation: another loss is refused
    argv = [*args, "--steps", "6", "--out", out, "--resume"]
    argv[argv.index("jsd")] = "kl"
    assert main(argv) == 2
    assert "from a run with different loss; resume with the run's own --loss" in capsys.readouterr().err


def test_reference_loss_is_the_next_token_loss_at_alpha_zero(make_tiny, tokens):
    model, _ = make_tiny()
    logits = model(tokens).logits
    loss = reference_loss(logits, logits, tokens, DistillConfig(alpha=0.0))
    assert loss.item() == pytest.approx(model(tokens, labels=tokens).loss.item(), rel=1e-5)
    assert F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item() == pytest.approx(loss.item())


# -- the teacher cache --------------------------------------------------------------------------------------
def _windows(seq=16, seed=0):
    from memfit.io import load_tokenizer
    from memfit.train.data import training_windows

    return training_windows(load_tokenizer("tiny-llama"), None, seq, seed)


def test_a_cache_of_every_token_gives_the_full_vocabulary_loss(make_tiny, tmp_path):
    teacher, _ = make_tiny()
    student = _perturbed(teacher)
    teacher.requires_grad_(False)
    windows = _windows()
    rows = [3, 0, 7]
    expected_meta = {"teacher": "t", "data": windows.fingerprint, "seq": 16, "temperature": 2.0,
                     "top_k": teacher.config.vocab_size, "vocab_size": teacher.config.vocab_size}
    cache = TeacherCache.build(tmp_path / "cache", teacher, windows, rows, expected_meta, chunk=5)
    ids = windows.windows[[7, 3]]
    for kind in Divergence:
        config = DistillConfig(kind, temperature=2.0, chunk=9)
        full = Distiller(student, teacher, config)(student, ids, [7, 3])
        cached = Distiller(student, None, config, cache)(student, ids, [7, 3])
        assert cached.item() == pytest.approx(full.item(), rel=2e-3), kind  # float16 log-probabilities


def test_the_cache_holds_256_bytes_per_token_at_top_64_and_keeps_the_rest_of_the_mass(tmp_path):
    teacher, _ = memfit.load("tiny-llama")
    windows = _windows(seq=32)
    meta = {"teacher": "t", "data": windows.fingerprint, "seq": 32, "temperature": 1.0, "top_k": 64,
            "vocab_size": teacher.config.vocab_size}
    cache = TeacherCache.build(tmp_path / "cache", teacher, windows, [1, 2], meta)
    assert cache.bytes_per_token == 256
    assert (tmp_path / "cache" / "ids.bin").stat().st_size + (tmp_path / "cache" / "logprobs.bin").stat().st_size \
        == 2 * 32 * 256
    top_ids, top = cache.lookup([2])
    with torch.no_grad():
        log_p = F.log_softmax(teacher(windows.windows[[2]]).logits.float(), -1)
    best = log_p.topk(64, -1)
    assert torch.equal(top_ids, best.indices)
    torch.testing.assert_close(top, best.values, rtol=1e-3, atol=1e-3)
    rest = 1 - best.values.exp().sum(-1)
    torch.testing.assert_close(with_rest(top, 256)[..., -1].exp(), rest, rtol=2e-2, atol=1e-4)
    with pytest.raises(CheckpointError, match=r"has no entry for training window 0 \(it was built for a run"):
        cache.lookup([0])


def test_cached_distillation_holds_no_teacher_and_no_more_than_a_training_step(tmp_path):
    # a vocabulary large enough that logits matter: the chunked head holds less than a plain step's
    kwargs = {"steps": 3, "batch": 4, "seq": 64, "device": "cpu"}
    plain = memfit.train("tiny-llama", **kwargs)
    cached = distill("tiny-llama", "none", teacher_cache=tmp_path / "cache", top_k=8, **kwargs)  # K << V
    assert cached.teacher_cache_bytes_per_token == cached.to_json()["teacher_cache_bytes_per_token"] == 32
    assert cached.peak_bytes[0] <= 1.05 * plain.peak_bytes[0]
    assert cached.losses[0] == pytest.approx(0.0, abs=2e-3)  # the student starts as the teacher itself
    again = distill("tiny-llama", "none", teacher_cache=tmp_path / "cache", **kwargs)  # reads the cache: same run
    assert again.losses == pytest.approx(cached.losses, rel=1e-6)


@pytest.mark.parametrize(("change", "message"), [
    ({"--temperature": "2"}, "was built with another --temperature"),
    ({"--seq": "32"}, "was built with another --seq"),
    ({"--top-k": "8"}, "was built with --top-k 16"),
    ({"--steps": "40"}, "has no entry for training window"),
    ({"--teacher": "tiny-qwen2"}, "was built with another teacher"),
])
def test_a_cache_from_another_teacher_data_or_setting_is_refused(tmp_path, capsys, change, message):
    args = {"--teacher": "tiny-llama", "--student": "none", "--steps": "2", "--batch": "2", "--seq": "16",
            "--teacher-cache": str(tmp_path / "cache"), "--top-k": "16"}
    assert main(["distill", *[x for kv in args.items() for x in kv]]) == 0
    capsys.readouterr()
    assert main(["distill", *[x for kv in {**args, **change}.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit distill: error: teacher cache ") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--teacher-cache", "CACHE", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--top-k", "8"], "--top-k sets the size of a teacher cache; pass --teacher-cache DIR with it"),
    (["--teacher-cache", "FILE"], "exists and is not a teacher cache"),
])
def test_teacher_cache_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    args = [{"CACHE": str(tmp_path / "cache"), "FILE": str(tmp_path / "file")}.get(a, a) for a in args]
    assert main(["distill", "--teacher", "tiny-llama", "--student", "none", "--steps", "1", "--batch", "2",
                 "--seq", "16", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit distill: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists()


# -- predictions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("teacher", "student", "top_k"), [
    ("tiny-llama", "drop-layers-1", None),  # fp32 teacher in memory
    ("INT8", "drop-layers-1", None),  # an int8 teacher: a quarter of its Linears' bytes
    ("tiny-llama", "int4-g128,lora-8", None),
    ("tiny-llama", "prune-mlp-25", 16),  # cached: no teacher
])
def test_predicted_distillation_peak_equals_the_tracked_one(tmp_path, teacher, student, top_k):
    from memfit.train.distill import estimate_distill
    from memfit.workload import Mode, Workload

    if teacher == "INT8":
        teacher = str(tmp_path / "int8")
        memfit.compress("tiny-llama", "int8", tmp_path / "int8")
    cache = {"teacher_cache": tmp_path / "cache", "top_k": top_k} if top_k else {}
    result = distill(teacher, student, steps=3, batch=2, seq=64, device="cpu", **cache)
    predicted = estimate_distill(teacher, student, Workload(mode=Mode.TRAIN, batch_size=2, seq_len=64),
                                 top_k=top_k)
    assert abs(predicted.peak_bytes - result.peak_bytes[0]) <= 0.01 * result.peak_bytes[0]


def test_a_budget_picks_the_micro_batch_of_a_distillation_step_teacher_included():
    from memfit.train.distill import estimate_distill
    from memfit.workload import Mode, Workload

    def predicted(micro):
        return estimate_distill("tiny-llama", "drop-layers-1", Workload(mode=Mode.TRAIN, batch_size=micro,
                                                                         seq_len=64)).peak_bytes

    budget = (predicted(2) + predicted(4)) // 2  # fits 2 sequences at once, not 4
    result = distill("tiny-llama", "drop-layers-1", steps=1, batch=4, seq=64, budget=budget, device="cpu")
    assert result.plan.recipe == "drop-layers-1,grad-accum-2"
    assert result.peak_bytes[0] <= budget
    with pytest.raises(memfit.BudgetError, match="a micro-batch of 1 sequence"):
        distill("tiny-llama", "drop-layers-1", steps=1, batch=4, seq=64, budget=predicted(1) // 2, device="cpu")


def test_estimate_cli_predicts_a_distillation_step(capsys):
    from memfit.train.distill import estimate_distill
    from memfit.workload import Mode, Workload

    workload = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=64)
    for extra, top_k in (([], None), (["--top-k", "16"], 16)):
        assert main(["estimate", "--model", "tiny-llama", "--mode", "distill", "--student", "drop-layers-1",
                     "--recipe", "adamw-8bit", "--batch", "2", "--seq", "64", "--json", *extra]) == 0
        data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        expected = estimate_distill("tiny-llama", "drop-layers-1", workload, recipe="adamw-8bit", top_k=top_k)
        assert data["peak_bytes"] == expected.peak_bytes
    teacher_bytes = sum(p.numel() * 4 for p in memfit.load("tiny-llama")[0].parameters())
    assert expected.peak_bytes < estimate_distill("tiny-llama", "drop-layers-1", workload,
                                                  recipe="adamw-8bit").peak_bytes - teacher_bytes // 2


# -- what the planner can propose -----------------------------------------------------------------------------
def _examples():
    from memfit.strategies.registry import strategy_classes

    return [pytest.param(example, id=example.token) for cls in strategy_classes() for example in cls.examples()]


@pytest.mark.parametrize("strategy", _examples())
def test_every_strategy_says_what_distillation_recovers_and_that_student_trains(strategy):
    from memfit.plan import Plan
    from memfit.strategies.base import Recovery
    from memfit.train.distill import recovery_student

    kind = type(strategy).recovers()
    student = recovery_student(Plan((strategy,)))
    if kind is Recovery.NONE:
        assert student is None
        return
    assert student == (Plan.parse(f"{strategy.token},lora-8").recipe if kind is Recovery.ADAPTERS
                       else strategy.token)
    result = distill("tiny-llama", student, steps=1, batch=2, seq=16, lr=1e-3, device="cpu")
    assert all(math.isfinite(loss) for loss in result.losses)
    trained = [name for name, p in result.model.named_parameters() if p.requires_grad]
    assert trained and (kind is Recovery.WEIGHTS or all("lora_" in name for name in trained))


# -- hidden states ------------------------------------------------------------------------------------------
def test_a_layer_dropped_student_matches_its_layers_to_the_teachers_it_kept(make_tiny, tokens):
    from memfit.train.distill import layer_map

    teacher, tokenizer = make_tiny()
    student = copy.deepcopy(teacher)
    memfit.apply(student, "drop-layers-1", memfit.Context(calibration=calibration_windows(tokenizer)))
    kept = layer_map(student, teacher)
    assert len(kept) == 1 and kept[0] in (0, 1)
    teacher.requires_grad_(False)
    config = DistillConfig(hidden="cosine", hidden_weight=0.5)
    loss = Distiller(student, teacher, config)(student, tokens)
    logits_only = Distiller(student, teacher, DistillConfig())(student, tokens)
    # one student layer, its last: nothing to match but the logits (the last output is normed)
    assert loss.item() == pytest.approx(logits_only.item(), rel=1e-6)

    assert layer_map(copy.deepcopy(teacher), teacher) == [0, 1]  # as many layers: the same index
    with torch.no_grad():
        t_states = teacher(tokens, output_hidden_states=True).hidden_states
    student = _perturbed(teacher)
    s_states = student(tokens, output_hidden_states=True).hidden_states
    loss = Distiller(student, teacher, DistillConfig(hidden="mse", hidden_weight=2.0))(student, tokens)
    base = Distiller(student, teacher, DistillConfig())(student, tokens)
    expected = 2.0 * F.mse_loss(s_states[1], t_states[1])  # layer 0's output; layer 1's is the normed last
    assert (loss - base).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_loss_needs_the_teacher_in_memory(tmp_path):
    with pytest.raises(RecipeError, match="--hidden-loss compares the teacher's hidden states, which a teacher cache"):
        distill("tiny-llama", "none", steps=1, batch=2, seq=16, hidden_loss="cosine", teacher_cache=tmp_path / "c")
    result = distill("tiny-llama", "drop-layers-1", steps=2, batch=2, seq=16, hidden_loss="cosine", device="cpu")
    assert result.to_json()["hidden_loss"] == "cosine" and all(math.isfinite(x) for x in result.losses)


def test_a_saved_structured_student_is_predicted_as_it_loads(tmp_path):
    # the skeleton of a saved drop-layers model is the saved config's shapes, not the recipe applied again
    from memfit.io import skeleton
    from memfit.train.distill import estimate_distill
    from memfit.workload import Mode, Workload

    memfit.compress("tiny-llama", "drop-layers-1", tmp_path / "student")
    assert len(skeleton(tmp_path / "student").model.layers) == len(memfit.load(tmp_path / "student")[0].model.layers)
    result = distill("tiny-llama", tmp_path / "student", steps=3, batch=2, seq=64, device="cpu")
    workload = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=64)
    predicted = estimate_distill("tiny-llama", tmp_path / "student", workload)
    assert abs(predicted.peak_bytes - result.peak_bytes[0]) <= 0.01 * result.peak_bytes[0]
