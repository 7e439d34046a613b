"""memfit.train and its parts on tiny models: optimizers, LoRA, accumulation, budgets, checkpoints, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import memfit
from memfit.cli.main import main
from memfit.optim import BLOCK, Adafactor, AdamW8bit, _Codebook
from memfit.profile import profile
from memfit.strategies.quantize.packed import Int4Linear
from memfit.train import checkpoint
from memfit.workload import Mode, Workload

TRAIN = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=64)
RECIPES = ["none", "adamw-8bit", "adafactor", "sgd", "bf16-master", "bf16-autocast", "checkpointing",
           "lora-8", "int4-g32,lora-8", "int8,lora-8", "grad-accum-2", "bf16-master,adamw-8bit,checkpointing"]


# -- optimizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codes_are_the_nearest_to_a_hair(signed):
    # values spanning eight decades within each block, as second moments do
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, BLOCK, generator=gen) * torch.logspace(-8, 0, BLOCK)[torch.randperm(BLOCK, generator=gen)]
    x = x if signed else x.abs()
    book = _Codebook(signed, torch.device("cpu"))
    codes, absmax = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(64)
    book.encode_(x, codes, absmax)
    decoded = book.decode(codes, absmax)
    normalized = (x / absmax[:, None]).reshape(-1, 1)
    nearest = book.values[(normalized - book.values).abs().argmin(1)].view_as(x) * absmax[:, None]
    error, best = (decoded - x).abs(), (nearest - x).abs()
    assert error.max() <= best.max() * 1.001
    assert error.mean() <= best.mean() * 1.05
    assert torch.equal(absmax, x.abs().amax(1))


def test_8bit_adamw_tracks_fp32_adamw_and_holds_a_quarter_of_its_state(make_tiny):
    model, _ = make_tiny("tiny-llama")
    full = profile(model, TRAIN).by_category["optimizer_state"]
    eight = profile(model, TRAIN, memfit.Plan.parse("adamw-8bit").run).by_category["optimizer_state"]
    assert eight <= 0.27 * full, (eight, full)

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(512, 96))
    q = nn.Parameter(p.detach().clone())
    a, b = AdamW8bit([p], lr=1e-3), torch.optim.AdamW([q], lr=1e-3, foreach=False)
    for _ in range(20):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert (p - q).norm() / q.norm() < 5e-4
    state = a.state[p]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].numel() == p.numel()
    a.load_state_dict(a.state_dict())
    assert a.state[p]["exp_avg_sq_codes"].dtype == torch.uint8


def test_8bit_adamw_fine_tune_ends_within_2_percent_of_fp32():
    kwargs = dict(steps=100, batch=4, seq=64, lr=3e-3, device="cpu")
    full = memfit.train("tiny-llama", recipe="none", **kwargs).losses
    eight = memfit.train("tiny-llama", recipe="adamw-8bit", **kwargs).losses
    assert full[-1] < 0.8 * full[0]  # it learned something
    assert abs(eight[-1] - full[-1]) / full[-1] < 0.02, (eight[-1], full[-1])


def test_adafactor_matches_torchs():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(64, 48)), nn.Parameter(torch.randn(48))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    a = Adafactor(ps, lr=1e-2, weight_decay=0.1)
    b = torch.optim.Adafactor(qs, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(10):
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert a.state[ps[0]]["row_var"].shape == (64, 1) and a.state[ps[0]]["col_var"].shape == (1, 48)


def test_master_weights_keep_fp32_copies_that_bf16_would_round_away():
    torch.manual_seed(0)
    model, tokenizer = memfit.load("tiny-llama")
    result = memfit.train(model, tokenizer, steps=3, batch=2, seq=32, recipe="bf16-master", lr=1e-4, device="cpu")
    params = [p for p in result.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    # the optimizer is gone with the run; a fresh one shows the layout on the trained model
    opt = result.plan.run.build_optimizer(result.model, 1e-4)
    assert [m.dtype for m in opt.masters] == [torch.float32] * len(params)
    p, master = params[0], opt.masters[0]
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    assert torch.equal(p, master.to(torch.bfloat16))
    assert not torch.equal(master, p.float())  # the master keeps what bf16 rounds off


# -- predictions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_prediction_equals_the_tracked_training_run(make_tiny, recipe):
    model, tokenizer = make_tiny("tiny-llama")
    predicted = memfit.estimate(model, recipe, TRAIN)
    result = memfit.train(model, tokenizer, steps=3, batch=2, seq=64, recipe=recipe, device="cpu")
    assert abs(predicted.peak_bytes - result.peak_bytes[0]) <= 0.01 * result.peak_bytes[0]
    baseline = memfit.estimate(make_tiny("tiny-llama")[0], "none", TRAIN).peak_bytes
    if recipe != "none":
        assert predicted.peak_bytes < baseline


@pytest.mark.parametrize("recipe", ["grad-accum-4", "lora-8,adamw-8bit,grad-accum-4"])
def test_a_prediction_that_runs_two_of_four_micro_batches_equals_the_tracked_run(make_tiny, recipe):
    model, tokenizer = make_tiny("tiny-llama")
    predicted = memfit.estimate(model, recipe, Workload(mode=Mode.TRAIN, batch_size=4, seq_len=64))
    result = memfit.train(model, tokenizer, steps=3, batch=4, seq=64, recipe=recipe, device="cpu")
    assert predicted.peak_bytes == result.peak_bytes[0]


# -- LoRA -------------------------------------------------------------------------------------------------
def test_lora_on_an_int4_base_trains_bf16_adapters_and_leaves_the_base(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    memfit.apply(model, "int4-g32")
    packed_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    result = memfit.train(model, tokenizer, steps=4, batch=2, seq=32, recipe="lora-8", device="cpu")
    trainable = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for p in trainable.values())
    assert any(isinstance(m, Int4Linear) for m in result.model.modules())
    # B starts at zero; after training the first layer's adapters moved, so gradients reached it
    first_b = [p for n, p in trainable.items() if "layers.0." in n and "lora_B" in n]
    assert first_b and all(p.abs().sum() > 0 for p in first_b)
    after = {n: b for n, b in result.model.named_buffers() if n.endswith("qweight")}
    assert all(torch.equal(packed_before[n.replace(".base_layer", "")], b) for n, b in after.items())


@pytest.mark.parametrize("chunk", [1 << 22, 8 * 64], ids=["whole", "8-rows-at-a-time"])
@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj", "lm_head"])
def test_packed_backward_matches_the_dequantized_layer(make_tiny, monkeypatch, chunk, name):
    from memfit.strategies.quantize import packed

    monkeypatch.setattr(packed, "BACKWARD_CHUNK", chunk)
    model, _ = make_tiny("tiny-llama")
    memfit.apply(model, "int4-g32")
    layer = model.get_submodule(name)
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    weights = torch.randn(3, 5, layer.out_features)  # a linear loss: its input gradient is weights @ W
    (layer(x) * weights).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(y, layer.dequantize()) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)


def test_a_saved_lora_model_loads_back_with_its_adapters(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    result = memfit.train(model, tokenizer, steps=3, batch=2, seq=32, recipe="int8,lora-8", lr=1e-2,
                          out=tmp_path / "run", device="cpu")
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model.eval()(ids).logits
    loaded, _ = memfit.load(result.out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert loaded.memfit_plan.recipe == "int8,lora-8"


def test_bf16_autocast_matches_torch_autocast_gradients(make_tiny):
    model, _ = make_tiny("tiny-llama")
    reference, _ = make_tiny("tiny-llama")
    model.train()
    reference.train()
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    with memfit.Plan.parse("bf16-autocast").run.forward("cpu"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reference(ids, labels=ids).loss
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# -- accumulation and budgets ---------------------------------------------------------------------------
def test_grad_accumulation_gives_the_full_batch_losses_with_a_lower_peak():
    kwargs = dict(steps=4, batch=4, seq=32, device="cpu")
    whole = memfit.train("tiny-llama", recipe="none", **kwargs)
    split = memfit.train("tiny-llama", recipe="grad-accum-4", **kwargs)
    torch.testing.assert_close(torch.tensor(split.losses), torch.tensor(whole.losses), rtol=1e-5, atol=0)
    assert split.peak_bytes[0] < whole.peak_bytes[0]


def test_budget_picks_the_largest_micro_batch_that_fits(make_tiny):
    model, _ = make_tiny("tiny-llama")
    wl = Workload(mode=Mode.TRAIN, batch_size=4, seq_len=64)
    peaks = {n: memfit.estimate(model, "none" if n == 1 else f"grad-accum-{n}", wl).peak_bytes for n in (1, 2, 4)}
    assert peaks[1] > peaks[2] > peaks[4]
    budget = (peaks[1] + peaks[2]) // 2  # the whole batch of 4 is too big, micro-batches of 2 fit
    result = memfit.train("tiny-llama", steps=2, batch=4, seq=64, budget=budget, device="cpu")
    assert result.plan.recipe == "grad-accum-2"
    assert result.peak_bytes[0] <= budget
    with pytest.raises(memfit.BudgetError, match=r"a micro-batch of 1 sequence\(s\) of 64 tokens needs .* over"):
        memfit.train("tiny-llama", steps=2, batch=4, seq=64, budget=peaks[4] // 2, device="cpu")


def test_out_of_memory_retries_the_step_with_smaller_micro_batches():
    model, tokenizer = memfit.load("tiny-llama")
    forward = model.forward

    def limited(input_ids=None, **kwargs):  # pretend anything above 1 sequence does not fit
        if input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("pretend")
        return forward(input_ids=input_ids, **kwargs)

    model.forward = limited
    result = memfit.train(model, tokenizer, steps=3, batch=4, seq=32, device="cpu")
    reference = memfit.train("tiny-llama", steps=3, batch=4, seq=32, recipe="grad-accum-4", device="cpu")
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-5, atol=0)


# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_trees_round_trip_without_pickle():
    tensors: dict[str, torch.Tensor] = {}
    state = {"state": {0: {"step": 3, "exp_avg": torch.arange(4.0)}}, "groups": [{"betas": (0.9, 0.99)}],
             "rng": (3, tuple(range(5)), None)}
    tree = checkpoint.flatten(state, tensors)
    restored = checkpoint.unflatten(json.loads(json.dumps(tree)), tensors)
    assert restored["state"][0]["step"] == 3 and torch.equal(restored["state"][0]["exp_avg"], torch.arange(4.0))
    assert restored["groups"][0]["betas"] == (0.9, 0.99) and restored["rng"] == (3, (0, 1, 2, 3, 4), None)


def _train_cli(out, *extra, env=None, **popen):
    command = [sys.executable, "-m", "memfit.cli.main", "train", "--model", "tiny-llama", "--steps", "8",
               "--batch", "4", "--seq", "32", "--recipe", "adamw-8bit", "--save-every", "3", "--out", str(out),
               "--json", *extra]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_loss(tmp_path):
    # the uninterrupted reference, in this process (the CLI runs the same memfit.train)
    expected = memfit.train("tiny-llama", steps=8, batch=4, seq=32, recipe="adamw-8bit", device="cpu").losses

    run = _train_cli(tmp_path / "killed", env={checkpoint.STALL_ENV: "6"})
    deadline = time.monotonic() + 300
    line = ""
    while "stalled writing checkpoint 6" not in line and time.monotonic() < deadline:
        line = run.stderr.readline()
    assert "stalled writing checkpoint 6" in line
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    root = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in checkpoint.complete(root)] == ["step-3"]
    assert (root / ".step-6.tmp").is_dir()  # half written, never renamed

    resumed = _train_cli(tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    losses = json.loads(out.splitlines()[-1])["losses"]
    assert len(losses) == 8
    assert abs(losses[-1] - expected[-1]) <= 1e-5 * abs(expected[-1])
    assert not (root / ".step-6.tmp").exists()
    assert [p.name for p in checkpoint.complete(root)] == ["step-6", "step-8"]


def test_resume_refuses_a_different_run(tmp_path, capsys):
    args = ["train", "--model", "tiny-llama", "--steps", "2", "--batch", "2", "--seq", "32", "--out", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:-2], "--seed", "1", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit train: error: checkpoint ") and "different seed" in err
    assert len(err.splitlines()) == 1


# -- CLI --------------------------------------------------------------------------------------------------
def test_a_run_directory_is_not_mixed_with_other_things(tmp_path, capsys):
    args = ["train", "--model", "tiny-llama", "--steps", "1", "--batch", "2", "--seq", "32", "--out", str(tmp_path)]
    (tmp_path / "notes.txt").write_text("mine")
    assert main(args) == 2
    assert "holds 'notes.txt', not only a training run's model and checkpoints" in capsys.readouterr().err
    (tmp_path / "notes.txt").unlink()
    assert main(args) == 0
    assert main(args) == 2  # a second run into the same directory would mix the two runs' checkpoints
    err = capsys.readouterr().err
    assert "already holds checkpoints of a run; pass --resume to continue it" in err


def test_train_cli_json_last_line(capsys):
    assert main(["train", "--model", "tiny-llama", "--steps", "3", "--batch", "2", "--seq", "32",
                 "--recipe", "lora-8,checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(data) == ["losses", "out", "peak_bytes", "recipe", "tokens_per_s"]
    assert len(data["losses"]) == 3 and isinstance(data["peak_bytes"], int) and data["peak_bytes"] > 0
    assert data["recipe"] == "checkpointing,lora-8" and data["out"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--recipe", "adamw-9bit"], "unknown recipe token 'adamw-9bit'"),
    (["--batch", "3", "--recipe", "grad-accum-2"], "batch 3 does not split into 1 rank(s) x 2 micro-batch(es)"),
    (["--data", "/nonexistent.txt"], "text file '/nonexistent.txt' does not exist"),
    (["--resume"], "--resume needs the run's output directory"),
    (["--budget", "1KB"], "a micro-batch of 1 sequence(s) of 32 tokens needs"),
    (["--nproc", "2", "--batch", "3"], "batch 3 does not split into 2 rank(s)"),
    (["--nproc", "2", "--model", "/no/such/model"], "model '/no/such/model' not found"),
    pytest.param(["--device", "cuda"], "--device cuda, but this PyTorch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_train_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    base = ["train", "--model", "tiny-llama", "--steps", "1", "--batch", "2", "--seq", "32"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memfit train: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_train_help_documents_every_token(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for token in ("adamw-8bit", "adafactor", "sgd", "bf16-autocast", "bf16-master", "checkpointing-K", "lora-R",
                  "grad-accum-N", "ddp", "fsdp", "--nproc", "--resume", "torchrun --nnodes"):
        assert token in text, token


def test_the_planner_offers_training_strategies_for_training_workloads_only():
    from memfit.planner.space import candidate_plans

    train = {p.recipe for p in candidate_plans(Workload(mode=Mode.TRAIN, batch_size=4, seq_len=64, ranks=2))}
    infer = {p.recipe for p in candidate_plans(Workload(batch_size=4, seq_len=64))}
    for recipe in ("adamw-8bit", "adafactor", "lora-8", "bf16-master", "grad-accum-2", "fsdp", "int4-g32,lora-8"):
        assert recipe in train, recipe
        assert recipe not in infer, recipe
    single = {p.recipe for p in candidate_plans(Workload(mode=Mode.TRAIN, batch_size=4, seq_len=64))}
    assert "fsdp" not in single  # one process: nothing to shard over


def test_a_checkpoint_holds_the_losses_of_its_own_steps_however_late_it_is_written(tmp_path, monkeypatch):
    # the writer thread serializes the state while later steps run: it must get a copy of the history
    write = checkpoint._write_json

    def slow(path, data):
        if path.name == checkpoint.STATE:
            time.sleep(0.5)  # step 2 appends its loss meanwhile
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_json", slow)
    result = memfit.train("tiny-llama", steps=3, batch=2, seq=32, device="cpu", out=tmp_path / "run", save_every=1)
    root = tmp_path / "run" / "checkpoints"
    for path in checkpoint.complete(root):
        state = json.loads((path / checkpoint.STATE).read_text())
        assert len(state["losses"]) == state["step"]
        assert state["losses"] == result.losses[: state["step"]]
