"""Every pruning method on the demo model in one table.

For each recipe: method, pattern and sparsity, perplexity and its change, bytes held (all weights,
and the decoder Linears' share against their dense fp32 bytes), decode tokens/s at batch 1 and
its ratio to the dense model, the time taken, and the tracked peak while pruning (with the peak
predicted before starting, for calibrated recipes). Each row runs in its own process (the
measuring code is shared with benchmarks/quantization.py).

    .venv/bin/python benchmarks/pruning.py --jsonl prune.jsonl [--tokens 4096] [--only prune-50-wanda]
    .venv/bin/python benchmarks/pruning.py --table prune.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from quantization import _append, _last_json, measure_recipe

RECIPES = (
    "fp32",
    "prune-50-magnitude", "prune-50-wanda", "prune-50-sparsegpt",
    "prune-2of4-magnitude", "prune-2of4-wanda", "prune-2of4-sparsegpt", "prune-4of8-wanda", "prune-4of8-sparsegpt",
    "prune-50-sparsegpt,int8", "prune-2of4-sparsegpt,int4-g128",
    "prune-mlp-25", "prune-heads-25", "drop-layers-4",
    "lowrank-mlp-50", "lowrank-mlp-50-act",
)


def linear_bytes(model) -> dict:
    """Bytes held by the decoder layers' Linears (pruned, factored or quantized, as they are now)."""
    from memfit.memory.report import weight_bytes
    from memfit.models.arch import decoder_parts

    layers = decoder_parts(model).layers
    norms = sum(weight_bytes(m) for layer in layers for m in layer.modules() if "norm" in type(m).__name__.lower())
    return {"linear_bytes": sum(weight_bytes(layer) for layer in layers) - norms}


def describe(recipe: str) -> tuple[str, str, str]:
    """(method, pattern, sparsity) of a recipe, for the table."""
    first = recipe.split(",")[0]
    parts = first.split("-")
    if first.startswith("prune-") and parts[1][0].isdigit():
        pattern = parts[1].replace("of", ":") if "of" in parts[1] else "unstructured"
        n, _, m = parts[1].partition("of")
        sparsity = f"{100 * (int(m) - int(n)) // int(m)}%" if m else f"{parts[1]}%"
        return parts[2], pattern, sparsity
    if first.startswith(("prune-mlp", "prune-heads")):
        return "structured", parts[1] + (" channels" if parts[1] == "mlp" else ""), f"{parts[2]}%"
    if first.startswith("drop-layers"):
        return "block influence", "layers", f"{parts[2]} layers"
    if first.startswith("lowrank"):
        method = "svd" + (" (activation-aware)" if first.endswith("-act") else "")
        return method, parts[1], f"{100 - int(parts[2])}% params"
    return "dense", "—", "0%"


def run_all(args: argparse.Namespace) -> None:
    recipes = args.only.split(";") if args.only else list(RECIPES)
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for recipe in recipes:
        print(f"{recipe} ...", file=sys.stderr)
        child = [sys.executable, __file__, "--child", recipe, "--model", args.model, "--tokens", str(args.tokens)]
        out = subprocess.run(child, capture_output=True, text=True, env=env)
        row = _last_json(out.stdout) or {"name": recipe, "error": out.stderr.strip()[-300:]}
        _append(args.jsonl, row)


def render(rows: list[dict]) -> str:
    base = next(r for r in rows if r["name"] == "fp32")
    num = lambda v, fmt: "—" if v is None else format(v, fmt)
    header = ("recipe", "method", "pattern", "sparsity", "perplexity", "change", "held MB", "Linears x dense",
              "decode tok/s", "x dense", "time s", "peak MB (predicted)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        if r.get("perplexity") is None:
            lines.append(f"| {r['name']} | not measured: {r.get('error')} |")
            continue
        peak = num(r.get("peak_bytes") and r["peak_bytes"] / 1e6, ".0f")
        if r.get("predicted_peak_bytes"):
            peak += f" ({r['predicted_peak_bytes'] / 1e6:.0f})"
        cells = (
            r["name"], *describe(r["name"]), f"{r['perplexity']:.3f}",
            f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%", f"{r['held_bytes'] / 1e6:.1f}",
            f"{r['linear_bytes'] / base['linear_bytes']:.3f}", num(r.get("decode_tokens_per_s"), ".1f"),
            num(r.get("decode_tokens_per_s") and r["decode_tokens_per_s"] / base["decode_tokens_per_s"], ".2f"),
            num(r.get("quantize_s"), ".1f"), peak,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (whole 512-token windows)")
    parser.add_argument("--only", help="semicolon-separated recipes (default: all of RECIPES)")
    parser.add_argument("--jsonl", default="pruning.jsonl", help="append results here")
    parser.add_argument("--table", help="render the table of a JSONL file and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_recipe(args.model, args.child, args.tokens, extra=linear_bytes)))
    elif args.table:
        with open(args.table) as f:
            print(render([json.loads(line) for line in f if line.strip()]))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
