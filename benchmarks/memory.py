"""Predicted against tracked memory on the demo model, for inference, generation and training.

For each workload: `memfit.estimate` (fake tensors, nothing allocated) and `memfit.memory.profile`
(the same code on real tensors, every allocation tracked); prints both peaks, their relative
difference and the tracked bytes by category.

    .venv/bin/python benchmarks/memory.py
"""

from __future__ import annotations

import time

import memfit
from memfit.memory import profile
from memfit.plan import Mode, Workload

WORKLOADS = [
    Workload(batch_size=1, seq_len=128),
    Workload(mode=Mode.GENERATE, batch_size=4, seq_len=256, new_tokens=16),
    Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256),
]


def main() -> None:
    model, _ = memfit.load("demo")
    print("| workload | predicted peak | tracked peak | difference | estimate s | by category (tracked) |")
    print("|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        start = time.perf_counter()
        predicted = memfit.estimate(model, "none", workload)
        seconds = time.perf_counter() - start
        tracked = profile(model, workload)
        categories = ", ".join(f"{k} {v:,}" for k, v in tracked.by_category.items() if v)
        label = f"{workload.mode.value} b{workload.batch_size} s{workload.seq_len}"
        if workload.new_tokens:
            label += f" +{workload.new_tokens}"
        print(f"| {label} | {predicted.peak_bytes:,} | {tracked.peak_bytes:,} "
              f"| {predicted.peak_bytes / tracked.peak_bytes - 1:+.2e} | {seconds:.1f} | {categories} |")


if __name__ == "__main__":
    main()
