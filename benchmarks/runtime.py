"""Decode speed of memfit's runtime against transformers' eager generate, side by side in one run.

For each format: batch-1 greedy decode of 64 tokens after a 32-token prompt through
(a) transformers' eager forward with its dynamic cache (what `memfit eval` measured before the
runtime), (b) the runtime's eager step, (c) the runtime's compiled step (CUDA graphs on CUDA).
Rounds are interleaved; medians; every rate is also given as a ratio to (a) in fp32 in the same run.
The first compiled generation of each format is timed separately (tracing and compiling).

    python benchmarks/runtime.py --model demo --formats fp32,bf16,int8,int4-g128
    python benchmarks/runtime.py --config path/to/config.json --device cuda --formats bf16   # random weights

With ``--config`` the model is built from a Hugging Face config with random weights (speed does
not depend on the values; for machines the weights cannot reach).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import memfit
from memfit.evaluate import decode_tokens_per_s
from memfit.runtime import Engine

PROMPT, NEW = 32, 64


def build(args):
    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model.eval()
    model, _ = memfit.load(args.model)
    return model.to(args.device).eval()


def variant(base, fmt: str, device: str):
    model = copy.deepcopy(base).cpu() if device != "cpu" else copy.deepcopy(base)
    if fmt != "fp32":
        memfit.apply(model, fmt)
    return model.to(device).eval()


def runtime_rate(engine: Engine, prompt: list[int], device: str) -> float:
    steps = engine.stream([prompt], NEW)
    next(steps)
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    count = sum(1 for _ in steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--config", help="build from this HF config with random weights instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4-g128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = build(args)
    prompt = torch.randint(0, base.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = {}
    for fmt in args.formats.split(","):
        model = variant(base, fmt, args.device)
        eager, compiled = Engine(model, compile=False), Engine(model, compile=True)
        began = time.perf_counter()
        for _ in compiled.stream([prompt], 4):
            pass
        first = time.perf_counter() - began
        runtime_rate(eager, prompt, args.device)  # warm-up
        rates = {"transformers": [], "runtime eager": [], "runtime compiled": []}
        ids = torch.tensor(prompt, device=args.device)
        for _ in range(args.rounds):
            rates["transformers"].append(decode_tokens_per_s(model, ids, NEW, repeats=1))
            rates["runtime eager"].append(runtime_rate(eager, prompt, args.device))
            rates["runtime compiled"].append(runtime_rate(compiled, prompt, args.device))
        rows[fmt] = {name: statistics.median(v) for name, v in rates.items()}
        rows[fmt]["first compiled start s"] = first
        rows[fmt]["compiled"] = compiled.compiled
        del model, eager, compiled
        print(fmt, json.dumps(rows[fmt]), file=sys.stderr, flush=True)
    reference = rows.get("fp32", next(iter(rows.values())))["transformers"]
    print(f"| format | transformers eager | runtime eager | runtime compiled | compiled / transformers fp32 | "
          f"first start (s) |  ({args.device}, batch 1, {NEW} tokens after {PROMPT})")
    print("|---|---|---|---|---|---|")
    for fmt, r in rows.items():
        print(f"| {fmt} | {r['transformers']:.1f} | {r['runtime eager']:.1f} | {r['runtime compiled']:.1f} | "
              f"{r['runtime compiled'] / reference:.2f}x | {r['first compiled start s']:.1f} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
