"""Training plans: `memfit optimize --mode train` (`memfit.planner.training`)."""

import json

import pytest

import memfit
from memfit.cli.main import main
from memfit.errors import BudgetError
from memfit.planner import training
from memfit.planner.training import compute_plan, optimize_training, training_plans
from memfit.settings import OptimizerKind
from memfit.strategies.base import Phase
from memfit.strategies.training import LoRA
from memfit.workload import Mode, Workload

WORK = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=32)


def fake_timer(model, plan, micro, seq):
    """Seconds of a micro-batch by a fixed rule: checkpointing recomputes, bf16 is faster, and a
    micro-batch of 2 is 10% faster per sequence."""
    recipe = plan.recipe
    per_sequence = 1e-3 * (1.3 if "checkpointing" in recipe else 1.0) * (0.7 if "bf16" in recipe else 1.0)
    return micro * per_sequence * (0.9 if micro == 2 else 1.0)


def test_the_space_comes_from_the_registry():
    plans = {p.recipe: p for p in training_plans(Workload(mode=Mode.TRAIN, batch_size=4, seq_len=32))}
    for recipe in ("none", "sgd,grad-accum-4", "lora-8", "int8,lora-8,grad-accum-2", "int4-g32,lora-8",
                   "bf16,checkpointing-2,lora-8", "bf16-master,checkpointing,adamw-8bit,grad-accum-2",
                   "checkpointing,bf16-autocast,adafactor"):
        assert recipe in plans
    assert not any(s.phase is Phase.STRUCTURE for p in plans.values() for s in p.strategies)
    assert not any(s.needs_calibration for p in plans.values() for s in p.strategies)  # no GPTQ base
    adapters = [p for p in plans.values() if any(isinstance(s, LoRA) for s in p.strategies)]
    assert adapters and all(p.settings.optimizer in (None, OptimizerKind.ADAMW) for p in adapters)
    frozen = [p for p in plans.values() if any(s.phase is Phase.QUANTIZE for s in p.strategies)]
    assert frozen and all(p in adapters for p in frozen)  # a quantized base only trains adapters
    assert not any(p.settings.autocast and any(s.phase is Phase.PRECISION for s in p.strategies)
                   for p in plans.values())
    assert {p.settings.micro_batches for p in plans.values()} == {None, 2, 4}
    with pytest.raises(memfit.RecipeError, match="training workload"):
        training_plans(Workload())


def test_the_lower_bound_never_exceeds_the_predicted_peak(make_tiny):
    model, _ = make_tiny("tiny-llama")
    search = training._Search(model, WORK, 0, fake_timer, None)
    for recipe in ("none", "adamw-8bit", "sgd,grad-accum-2", "adafactor", "bf16-master,adamw-8bit",
                   "int4-g32,lora-8", "bf16-master,checkpointing,lora-8"):
        plan = memfit.Plan.parse(recipe, WORK)
        bound = search.lower_bound(plan)
        assert 0 < bound <= memfit.estimate(model, plan, WORK).peak_bytes, recipe


def test_the_fastest_predicted_plans_that_fit_are_verified_and_the_fastest_measured_is_chosen(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    budget = 1_700_000
    result = optimize_training(model, tokenizer, budget, WORK, verify=2, steps=2, timer=fake_timer)
    ordered = result.candidates
    verified = [c for c in ordered if c.measured_tokens_per_s is not None]
    assert len(verified) == 2 and result.best in verified
    assert result.best.measured_tokens_per_s == max(c.measured_tokens_per_s for c in verified)
    assert result.best.measured_peak_bytes == result.best.predicted_peak_bytes <= budget  # tracked = predicted
    # every plan predicted faster than the second verified one is over the budget
    last = ordered.index(verified[-1])
    assert all(c.fits is False for c in ordered[:last] if c not in verified)
    assert all(c.predicted_peak_bytes is None or c.predicted_peak_bytes > budget for c in ordered[:last]
               if c not in verified)
    # the speed model: a checkpointed plan is predicted slower than the same plan without it
    speed = {c.plan.recipe: c.predicted_tokens_per_s for c in ordered}
    assert speed["checkpointing,lora-8"] < speed["lora-8"]
    assert speed["lora-8"] > speed["lora-8,grad-accum-2"]  # the micro-batch of 2 is faster per sequence
    assert compute_plan(result.best.plan).settings.optimizer is None


def test_a_budget_below_every_plan_names_the_smallest(make_tiny):
    model, tokenizer = make_tiny("tiny-llama")
    with pytest.raises(BudgetError, match=r"no training plan fits 100 KB: the smallest, .*lora-8.*, holds at least"):
        optimize_training(model, tokenizer, 100_000, WORK, timer=fake_timer)
    # over the lower bounds of the int4 plans only: those are predicted, and the smallest named
    with pytest.raises(BudgetError, match=r"no training plan fits 260 KB: the smallest, int4-g\d+,\S*lora-8\S*, "
                                          r"needs 4\d\d KB; raise the budget to at least"):
        optimize_training(model, tokenizer, 260_000, WORK, timer=fake_timer)


def test_the_cli_writes_the_plan_that_memfit_train_reads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training._Timer, "micro_batch", lambda self, model, plan, micro, seq: fake_timer(
        model, plan, micro, seq))
    out = tmp_path / "plan"
    code = main(["optimize", "--model", "tiny-llama", "--budget", "1.7MB", "--mode", "train", "--batch", "2",
                 "--seq", "32", "--verify", "1", "--steps", "2", "--out", str(out), "--json"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["measured_peak_bytes"] <= 1_700_000 and shown["workload"]["batch_size"] == 2
    assert memfit.Plan.parse(str(out / "plan.yaml")).recipe == shown["plan"]
    assert shown["plan"] in (out / "report.md").read_text()
    trained = memfit.train("tiny-llama", recipe=str(out / "plan.yaml"), steps=2, batch=2, seq=32, device="cpu")
    assert trained.peak_bytes[0] == shown["measured_peak_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "30%"], "needs --budget in bytes"),
    (["--budget", "1GiB", "--objective", "speed"], "takes no --max-ppl-increase or --objective"),
])
def test_bad_training_searches_are_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["optimize", "--model", "tiny-llama", "--mode", "train", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
