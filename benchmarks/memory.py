"""Predicted against tracked memory on the demo model, the RSS the tracker explains, and batch sizing.

Three tables, in Markdown:

1. For each workload of the acceptance grid: `memfit.estimate` (fake tensors, nothing allocated)
   against `memfit.profile` (the same code on real tensors, every allocation tracked): both
   peaks, their relative difference, the worst relative difference over categories holding more
   than 1% of the peak, and the tracked bytes by category.
2. For a few workloads, ``memfit profile --json`` in its own process: the process RSS growth
   during the run and the share of it the tracked peak explains.
3. `max_batch_size` under a 1 GiB training budget, and the tracked peak at that batch.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --modes generate    # the first table's generate rows only
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import memfit
from memfit.estimate import max_batch_size
from memfit.profile import profile
from memfit.units import parse_bytes
from memfit.workload import Mode, Workload

GRID = [
    ("none", Workload(batch_size=1, seq_len=128)),
    ("none", Workload(batch_size=1, seq_len=1024)),
    ("none", Workload(batch_size=8, seq_len=128)),
    ("none", Workload(batch_size=8, seq_len=1024)),
    ("none", Workload(mode=Mode.GENERATE, batch_size=4, seq_len=256, new_tokens=256)),
    ("none", Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256)),
    ("checkpointing", Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256)),
    ("bf16-autocast", Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256)),
    ("sgd", Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256)),
    ("int8", Workload(mode=Mode.GENERATE, batch_size=4, seq_len=256, new_tokens=256)),
]
RSS_RUNS = [
    ["--mode", "infer", "--batch", "8", "--seq", "1024"],
    ["--mode", "generate", "--batch", "4", "--seq", "256", "--new-tokens", "256"],
    ["--mode", "train", "--batch", "2", "--seq", "256"],
    ["--mode", "train", "--batch", "2", "--seq", "256", "--recipe", "checkpointing"],
]
BATCH_BUDGET = "1GiB"
BATCH_WORKLOAD = Workload(mode=Mode.TRAIN, seq_len=256)
BATCH_RECIPE = "bf16,sgd,checkpointing"


def label(recipe: str, workload: Workload) -> str:
    text = f"{workload.mode.value} b{workload.batch_size} s{workload.seq_len}"
    if workload.new_tokens:
        text += f"+{workload.new_tokens}"
    return f"{text}, {recipe}"


def worst_category_error(predicted: memfit.MemoryReport, tracked: memfit.MemoryReport) -> float:
    big = [c for c, v in tracked.by_category.items() if v > 0.01 * tracked.peak_bytes]
    return max(abs(predicted.by_category[c] / tracked.by_category[c] - 1) for c in big)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="", help="only the first table's rows of these modes (comma-separated)")
    args = parser.parse_args()
    modes = set(filter(None, args.modes.split(",")))
    model, _ = memfit.load("demo")
    print("| workload, recipe | predicted peak | tracked peak | peak diff | worst category diff | estimate s "
          "| tracked by category |")
    print("|---|---|---|---|---|---|---|")
    for recipe, workload in GRID:
        if modes and workload.mode.value not in modes:
            continue
        start = time.perf_counter()
        predicted = memfit.estimate(model, recipe, workload)
        seconds = time.perf_counter() - start
        plan = memfit.Plan.parse(recipe)
        applied = memfit.apply(memfit.load("demo")[0], plan) if recipe != "none" else model
        tracked = profile(applied, workload, plan.run)
        categories = ", ".join(f"{k} {v:,}" for k, v in tracked.by_category.items() if v)
        peak_diff = predicted.peak_bytes / tracked.peak_bytes - 1
        print(f"| {label(recipe, workload)} | {predicted.peak_bytes:,} | {tracked.peak_bytes:,} | {peak_diff:+.2e} "
              f"| {worst_category_error(predicted, tracked):.2e} | {seconds:.1f} | {categories} |", flush=True)
    if modes:
        return

    print("\n| memfit profile --model demo | RSS growth | tracked growth | explained |")
    print("|---|---|---|---|")
    for args in RSS_RUNS:
        out = subprocess.run([sys.executable, "-m", "memfit.cli.main", "profile", "--model", "demo", *args, "--json"],
                             capture_output=True, text=True, check=True).stdout
        data = json.loads(out.strip().splitlines()[-1])
        share = data["tracked_growth_bytes"] / data["rss_growth_bytes"]
        print(f"| {' '.join(args)} | {data['rss_growth_bytes']:,} | {data['tracked_growth_bytes']:,} | {share:.1%} |",
              flush=True)

    batch = max_batch_size(model, BATCH_BUDGET, BATCH_WORKLOAD, BATCH_RECIPE)
    at = lambda b: dataclasses.replace(BATCH_WORKLOAD, batch_size=b)
    next_peak = memfit.estimate(model, BATCH_RECIPE, at(batch + 1)).peak_bytes
    plan = memfit.Plan.parse(BATCH_RECIPE)
    tracked = profile(memfit.apply(memfit.load("demo")[0], plan), at(batch), plan.run).peak_bytes
    print("\n| budget | workload, recipe | max batch | tracked peak at it | predicted peak at batch + 1 |")
    print("|---|---|---|---|---|")
    print(f"| {BATCH_BUDGET} ({parse_bytes(BATCH_BUDGET):,}) | {label(BATCH_RECIPE, at(batch))} | {batch} "
          f"| {tracked:,} | {next_peak:,} |")


if __name__ == "__main__":
    main()
