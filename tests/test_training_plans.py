"""Training plans: `memfit optimize --mode train` (`memfit.planner.training`)."""

import json

import pytest

import memfit
from memfit.cli.main import main
from memfit.errors import BudgetError
from memfit.planner import training
from memfit.planner.training import compute_plan, optimize_training, training_plans
from memfit.settings import OptimizerKind, Parallelism
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


RANKS = Workload(mode=Mode.TRAIN, batch_size=4, seq_len=32, ranks=2)


def ranked_timer(model, plan, micro, seq, sync=False):
    """`fake_timer`, plus what the synchronized micro-batch adds: DDP all-reduces every gradient,
    FSDP reduce-scatters them (half the traffic)."""
    extra = (2e-3 if plan.run.parallelism is Parallelism.DDP else 1e-3) if sync else 0.0
    return fake_timer(model, plan, micro, seq) + extra


def test_plans_over_two_ranks_are_verified_in_two_processes(make_tiny):
    plans = training_plans(RANKS)
    assert {p.settings.parallelism for p in plans} == {Parallelism.DDP, Parallelism.FSDP}
    assert {p.settings.micro_batches for p in plans} == {None, 2}  # of a rank's 2 sequences
    model, tokenizer = make_tiny("tiny-llama")
    search = training._Search(model, RANKS, 0, ranked_timer, None)
    ddp, fsdp = (memfit.Plan.parse(recipe, RANKS) for recipe in ("ddp,adamw-8bit", "fsdp,adamw-8bit"))
    assert search.lower_bound(fsdp) < search.lower_bound(ddp)  # a shard of each
    assert 0 < search.lower_bound(fsdp) <= memfit.estimate(model, fsdp, RANKS).peak_bytes
    assert search.lower_bound(ddp) <= memfit.estimate(model, ddp, RANKS).peak_bytes

    budget = 1_500_000
    result = optimize_training(model, tokenizer, budget, RANKS, verify=1, steps=2, timer=ranked_timer)
    best = result.best
    assert best.plan.settings.parallelism is not None
    # the verification ran `memfit.train` in two processes: the largest rank's tracked peak
    assert 0 < best.measured_peak_bytes <= budget and best.measured_tokens_per_s > 0
    assert abs(best.measured_peak_bytes - best.predicted_peak_bytes) <= 0.05 * best.measured_peak_bytes
    # the speed model: the same plan is predicted slower with DDP's larger synchronization ...
    speed = {c.plan.recipe: c.predicted_tokens_per_s for c in result.candidates}
    assert speed["lora-8,ddp"] < speed["lora-8,fsdp"]
    # ... which a step pays once, however many micro-batches it has
    seconds = {r: 4 * 32 / speed[r] for r in ("lora-8,ddp", "lora-8,grad-accum-2,ddp")}
    assert seconds["lora-8,grad-accum-2,ddp"] - seconds["lora-8,ddp"] == pytest.approx(
        2 * fake_timer(model, compute_plan(memfit.Plan.parse("lora-8")), 1, 32) * (1 - 0.9), rel=1e-6)


def test_the_rank_pool_times_a_micro_batch_in_every_rank(make_tiny):
    from memfit.planner.ranks import RankPool

    model, tokenizer = make_tiny("tiny-llama")
    plan = memfit.Plan.parse("ddp", RANKS)
    with RankPool(model, tokenizer, RANKS) as pool:
        local, synced = pool.micro_batch(model, plan, 1, 32), pool.micro_batch(model, plan, 1, 32, sync=True)
        assert local > 0 and synced > 0
        with pytest.raises(RuntimeError, match=r"rank \d: RecipeError: steps, batch and seq must be positive"):
            pool.train(plan, data=None, steps=0, batch=4, seq=32, seed=0)
        assert pool.micro_batch(model, plan, 1, 32) > 0  # the ranks still answer
    assert all(not p.is_alive() for p in pool._processes)


def test_plans_too_close_for_one_run_are_decided_by_the_median_of_interleaved_rounds():
    runs = {"lora-8": [100.0, 90.0, 91.0], "bf16,lora-8": [98.0, 99.0, 97.0], "int8,lora-8": [50.0]}
    order = []

    def run(plan):
        order.append(plan.recipe)
        return runs[plan.recipe].pop(0), 1000

    fitting = [training.TrainCandidate(memfit.Plan.parse(r, WORK), 0, 1000, True, 1.0) for r in runs]
    best = training._verify(fitting, run, 2000, progress=None)
    assert best.plan.recipe == "bf16,lora-8" and best.measured_tokens_per_s == 98.0
    assert fitting[0].measured_tokens_per_s == 91.0 and fitting[2].measured_tokens_per_s == 50.0
    # once each, then the two within 5% of the fastest in alternation; the slow plan once
    assert order == ["lora-8", "bf16,lora-8", "int8,lora-8", "lora-8", "bf16,lora-8", "lora-8", "bf16,lora-8"]


def test_nproc_without_a_training_search_is_one_line_exit_2(tmp_path, capsys):
    code = main(["optimize", "--model", "tiny-llama", "--budget", "50%", "--nproc", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--nproc spreads a training step over processes" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_verified_plans_that_all_held_more_than_the_budget_are_one_budget_error():
    fitting = [training.TrainCandidate(memfit.Plan.parse(r, WORK), 0, 1000, True, 1.0) for r in ("lora-8", "sgd")]
    with pytest.raises(BudgetError, match=r"the 2 plan\(s\) predicted to fit 1 KB held more when run "
                                          r"\(the least, lora-8, 1.1 KB\)"):
        training._verify(fitting, lambda plan: (10.0, 1100 if plan.recipe == "lora-8" else 1200), 1000, progress=None)
