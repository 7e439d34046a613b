"""The training-plan search on the demo model, and its choice against other plans that fit, run for real.

For each budget, `optimize_training` searches as ``memfit optimize --mode train`` does (lower
bounds, exact peaks fastest predicted first, throughput from measured micro-batches and optimizer
steps, the fastest few that fit verified by real runs). Then more plans that fit are run for real
with the same ``--steps``: the ``--check`` next ones in the search's predicted order past those it
verified, and the fastest predicted plan that fits of every other "what trains" group (every
weight; adapters on the fp32 model or on each frozen base), their peaks predicted the same way.
The table gives each run plan's predicted and measured tokens/s and peaks; the chosen plan should
hold the highest measured tokens/s of every plan run, within the budget.

    .venv/bin/python benchmarks/train_planner.py                        # 1GiB and 2GiB, batch 8, seq 256
    .venv/bin/python benchmarks/train_planner.py --budgets 2GiB --check 10

With ``--all`` it checks the choice against the whole space instead: every plan whose lower bound
is within the budget runs for real (``--all-steps`` steps, the first untimed), and those whose
tracked peak is within the budget are the plans that fit. Then the chosen plan and every fitting
plan measured within ``--margin`` of it (or faster) run again in ``--rounds`` interleaved rounds;
the verdict compares their medians.

    .venv/bin/python benchmarks/train_planner.py --budgets 1GiB --all
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import memfit
from memfit.estimate import estimate
from memfit.planner.training import optimize_training, trains
from memfit.strategies.training import LoRA
from memfit.units import format_bytes, parse_bytes
from memfit.workload import Mode, Workload


def _group(plan) -> str:
    """What trains: "every weight", or the adapters and the frozen base under them."""
    if not any(isinstance(s, LoRA) for s in plan.strategies):
        return "every weight"
    frozen = [s.token for s in plan.strategies if not trains(s)]
    return "adapters on " + (",".join(frozen) or "fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budgets", default="1GiB,2GiB")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps of every real run (the first is not timed)")
    parser.add_argument("--check", type=int, default=3, help="fitting plans run past those the search verified")
    parser.add_argument("--all", action="store_true", help="run every plan whose lower bound fits")
    parser.add_argument("--all-steps", type=int, default=2, help="steps of each run of --all (the first untimed)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the contenders of --all")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="--all: rerun plans measured within this fraction of the chosen plan or faster")
    args = parser.parse_args()

    model, tokenizer = memfit.load(args.model)
    workload = Workload(mode=Mode.TRAIN, batch_size=args.batch, seq_len=args.seq)
    for text in args.budgets.split(","):
        budget = parse_bytes(text)
        began = time.perf_counter()
        result = optimize_training(model, tokenizer, budget, workload, steps=args.steps)
        seconds = time.perf_counter() - began
        predicted = sum(c.predicted_peak_bytes is not None for c in result.candidates)
        print(f"\n## {text}: batch {args.batch}, seq {args.seq}; {len(result.candidates)} plans, "
              f"{predicted} peaks predicted, search {seconds:.0f} s; chosen {result.best.plan.recipe}")

        if args.all:
            _check_all(model, tokenizer, result, budget, args)
            continue
        checks = []
        groups = {_group(c.plan) for c in result.candidates if c.measured_tokens_per_s is not None}
        for c in result.candidates:
            if c.fits is False or c.measured_tokens_per_s is not None or c.lower_bound_bytes > budget:
                continue
            group = _group(c.plan)
            if len(checks) >= args.check and group in groups:
                continue
            if c.predicted_peak_bytes is None:
                c.predicted_peak_bytes = estimate(model, c.plan, workload).peak_bytes
                c.fits = c.predicted_peak_bytes <= budget
            if c.fits:
                checks.append(c)
                groups.add(group)
        for c in checks:
            run = memfit.train(copy.deepcopy(model), tokenizer, steps=args.steps, batch=args.batch, seq=args.seq,
                               recipe=c.plan, device="cpu")
            c.measured_tokens_per_s, c.measured_peak_bytes = run.tokens_per_s, run.peak_bytes[0]

        ran = [c for c in result.candidates if c.measured_tokens_per_s is not None]
        print("| plan | what trains | predicted peak | tracked peak | predicted tok/s | measured tok/s |")
        print("|---|---|---|---|---|---|")
        for c in sorted(ran, key=lambda c: -c.measured_tokens_per_s):
            mark = " (chosen)" if c is result.best else ""
            print(f"| `{c.plan.recipe}`{mark} | {_group(c.plan)} | {format_bytes(c.predicted_peak_bytes)} | "
                  f"{format_bytes(c.measured_peak_bytes)} | {c.predicted_tokens_per_s:.0f} | "
                  f"{c.measured_tokens_per_s:.0f} |")
        fastest = max(ran, key=lambda c: c.measured_tokens_per_s)
        within = all(c.measured_peak_bytes <= budget for c in ran)
        print(f"chosen {result.best.measured_tokens_per_s:.0f} tokens/s, fastest run {fastest.plan.recipe} "
              f"{fastest.measured_tokens_per_s:.0f}; every run within the budget: {within}")


def _run(model, tokenizer, plan, args, steps: int):
    run = memfit.train(copy.deepcopy(model), tokenizer, steps=steps, batch=args.batch, seq=args.seq, recipe=plan,
                       device="cpu")
    return run.tokens_per_s, run.peak_bytes[0]


def _check_all(model, tokenizer, result, budget: int, args) -> None:
    """Run every plan whose lower bound fits; rerun the chosen plan and its close contenders in rounds."""
    began = time.perf_counter()
    runnable = [c for c in result.candidates if c.lower_bound_bytes <= budget]
    first: dict[str, tuple[float, int]] = {}
    for i, c in enumerate(runnable):
        if c.measured_tokens_per_s is not None:  # verified by the search (its own run, --steps steps)
            first[c.plan.recipe] = (c.measured_tokens_per_s, c.measured_peak_bytes)
            continue
        first[c.plan.recipe] = _run(model, tokenizer, c.plan, args, args.all_steps)
        print(f"  [{i + 1}/{len(runnable)}] {c.plan.recipe}: {first[c.plan.recipe][0]:.0f} tokens/s, "
              f"peak {format_bytes(first[c.plan.recipe][1])}", flush=True)
    fitting = [c for c in runnable if first[c.plan.recipe][1] <= budget]
    mismatched = [c for c in fitting if c.predicted_peak_bytes is not None
                      and c.predicted_peak_bytes != first[c.plan.recipe][1]]
    chosen = result.best
    bar = first[chosen.plan.recipe][0] * (1 - args.margin)
    contenders = [c for c in fitting if c is not chosen and first[c.plan.recipe][0] >= bar]
    print(f"{len(runnable)} plans run ({time.perf_counter() - began:.0f} s), {len(fitting)} fit by their tracked "
          f"peak; {len(contenders)} within {args.margin:.0%} of the chosen plan; {len(mismatched)} predicted "
          "peaks differ from the tracked ones")
    rounds: dict[str, list[float]] = {c.plan.recipe: [] for c in [chosen, *contenders]}
    peaks: dict[str, int] = {}
    for _ in range(args.rounds):
        for c in [chosen, *contenders]:
            tokens_per_s, peaks[c.plan.recipe] = _run(model, tokenizer, c.plan, args, args.steps)
            rounds[c.plan.recipe].append(tokens_per_s)
    print("| plan | what trains | tracked peak | first run tok/s | median tok/s of the rounds |")
    print("|---|---|---|---:|---:|")
    for recipe, values in sorted(rounds.items(), key=lambda kv: -statistics.median(kv[1])):
        plan = next(c.plan for c in fitting if c.plan.recipe == recipe)
        mark = " (chosen)" if recipe == chosen.plan.recipe else ""
        print(f"| `{recipe}`{mark} | {_group(plan)} | {format_bytes(peaks[recipe])} | {first[recipe][0]:.0f} | "
              f"{statistics.median(values):.0f} |")
    best = max(rounds, key=lambda r: statistics.median(rounds[r]))
    print(f"chosen {chosen.plan.recipe} median {statistics.median(rounds[chosen.plan.recipe]):.0f} tokens/s; "
          f"fastest median {best}; the chosen plan is the fastest of the {len(fitting)} that fit: "
          f"{best == chosen.plan.recipe}")


if __name__ == "__main__":
    main()
