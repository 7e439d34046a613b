"""Training strategies on the demo model: tracked peak against prediction, speed, and a fine-tune.

Two tables, in Markdown:

1. ``--part memory``: for each recipe, the peak `memfit.estimate` predicts for a training step
   (batch 2, seq 256, fake tensors) and the peak `memfit.train` tracks over 3 real steps on the
   built-in text, their relative difference, the tracked optimizer state and gradients at the
   peak, and tokens/s (steps 2-3; side by side in one run, so compare the ratios).
2. ``--part finetune``: perplexity on the built-in evaluation half before and after 50 steps of
   fine-tuning on the calibration half (batch 4, seq 256), for a full fine-tune and for LoRA.

    .venv/bin/python benchmarks/training.py --part memory
    .venv/bin/python benchmarks/training.py --part finetune
"""

from __future__ import annotations

import argparse
import time

import torch

import memfit
from memfit.units import format_bytes
from memfit.workload import Mode, Workload

RECIPES = [
    "none",  # fp32 weights, AdamW: the baseline
    "bf16-autocast",
    "checkpointing",
    "adamw-8bit",
    "adafactor",
    "lora-8",
    "int4-g128,lora-8",
    "sgd",
    "bf16-master",
    "grad-accum-2",
    "bf16-master,adamw-8bit,checkpointing",
]
WORKLOAD = Workload(mode=Mode.TRAIN, batch_size=2, seq_len=256)


def memory() -> None:
    print(f"Demo model, training step at batch {WORKLOAD.batch_size}, seq {WORKLOAD.seq_len}, CPU "
          f"({torch.get_num_threads()} threads).\n")
    print("| recipe | predicted peak | tracked peak | difference | vs fp32 AdamW | optimizer state | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for recipe in RECIPES:
        model, tokenizer = memfit.load("demo")
        predicted = memfit.estimate(model, recipe, WORKLOAD).peak_bytes
        result = memfit.train(model, tokenizer, steps=3, batch=WORKLOAD.batch_size, seq=WORKLOAD.seq_len,
                              recipe=recipe, device="cpu")
        tracked = result.peak_bytes[0]
        baseline = baseline or tracked
        state = result.report.by_category["optimizer_state"]
        print(f"| {recipe} | {format_bytes(predicted)} | {format_bytes(tracked)} | "
              f"{(predicted - tracked) / tracked:+.2%} | {tracked / baseline:.2f}x | {format_bytes(state)} | "
              f"{result.tokens_per_s:.0f} |", flush=True)
        del model, result


def finetune() -> None:
    print("Demo model, 50 steps at batch 4, seq 256 on the built-in calibration half; perplexity on the "
          "evaluation half (16,384 tokens).\n")
    print("| recipe | lr | loss first -> last | perplexity before | after | change | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for recipe, lr in (("none", 1e-5), ("lora-8", 1e-3)):
        model, tokenizer = memfit.load("demo")
        before = memfit.evaluate(model, tokenizer, measure_speed=False).perplexity
        began = time.perf_counter()
        result = memfit.train(model, tokenizer, steps=50, batch=4, seq=256, recipe=recipe, lr=lr, device="cpu")
        minutes = (time.perf_counter() - began) / 60
        after = memfit.evaluate(result.model.eval(), tokenizer, measure_speed=False).perplexity
        print(f"| {recipe} | {lr:g} | {result.losses[0]:.3f} -> {result.losses[-1]:.3f} | {before:.3f} | "
              f"{after:.3f} | {(after - before) / before:+.1%} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "finetune"), required=True)
    {"memory": memory, "finetune": finetune}[parser.parse_args().part]()
