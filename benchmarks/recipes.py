"""Quality, bytes and speed of each recipe on the demo model, measured side by side in one run.

For fp32 and every recipe: perplexity on the evaluation tokens and its change, weight bytes and
their share of fp32, time to apply, prefill and decode tokens/s and their ratio to fp32 (the same
process, one after the other, so the ratios are comparable on a noisy machine).

    .venv/bin/python benchmarks/recipes.py [--tokens 16384] [--recipes int8,int4-g128,...]
"""

from __future__ import annotations

import argparse
import copy
import time

import memfit

DEFAULT_RECIPES = "bf16;int8;int8,bf16;int4-g128;int4-g64;int4-g128,bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="semicolon-separated recipes")
    args = parser.parse_args()
    model, tokenizer = memfit.load(args.model)
    base = memfit.evaluate(model, tokenizer, num_tokens=args.tokens)
    rows = [("fp32", base, 0.0)]
    for recipe in args.recipes.split(";"):
        work = copy.deepcopy(model)
        start = time.perf_counter()
        memfit.apply(work, recipe)
        seconds = time.perf_counter() - start
        rows.append((recipe, memfit.evaluate(work, tokenizer, num_tokens=args.tokens), seconds))
        del work
    print(f"model {args.model}, {base.eval_tokens} evaluation tokens")
    header = ("recipe", "perplexity", "change", "weight MB", "of fp32", "apply s", "prefill tok/s", "x fp32",
              "decode tok/s", "x fp32")
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for recipe, m, seconds in rows:
        print(
            f"| {recipe} | {m.perplexity:.3f} | {100 * (m.perplexity / base.perplexity - 1):+.2f}% "
            f"| {m.weight_bytes / 1e6:.2f} | {100 * m.weight_bytes / base.weight_bytes:.2f}% | {seconds:.1f} "
            f"| {m.prefill_tokens_per_s:.0f} | {m.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f} "
            f"| {m.decode_tokens_per_s:.1f} | {m.decode_tokens_per_s / base.decode_tokens_per_s:.2f} |"
        )


if __name__ == "__main__":
    main()
