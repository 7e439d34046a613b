"""Calibration memory on the demo model: the peak `memfit compress` predicts before it starts (the
calibration run on fake tensors under the tracker) against the tracked peak of the run itself.

Each recipe runs ``memfit compress --json`` in its own process, one after the other, and the table
gives both peaks from its JSON line, their relative difference, the phase the prediction places
the peak in, and the wall time of the whole command (prediction, calibration, evaluation, saving).

    .venv/bin/python benchmarks/calibration_memory.py [--windows 32] [--only R1,R2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# every calibrated family: GPTQ, AWQ, AWQ+GPTQ, SmoothQuant, Wanda, SparseGPT, mixed bits,
# activation-aware low-rank, structured pruning (channels, heads, layers)
RECIPES = (
    "int4-g128-gptq", "int4-g128-awq", "int4-g128-awq-gptq", "w8a8-smooth", "prune-50-wanda",
    "prune-50-sparsegpt", "mixed-bits-6", "lowrank-mlp-50-act", "prune-mlp-25", "prune-heads-25", "drop-layers-4",
)


def run(recipe: str, windows: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(Path(sys.executable).parent / "memfit"), "compress", "--model", "demo", "--recipe", recipe,
                   "--out", str(Path(tmp) / "out"), "--calibration-windows", str(windows),
                   "--tokens", str(tokens), "--json"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    phase = next((line.split(" in ", 1)[1].rsplit(" (", 1)[0] for line in done.stderr.splitlines()
                  if "; predicted peak " in line), "")
    return {"recipe": recipe, "predicted": result["predicted_calibration_bytes"],
            "tracked": result["calibration_peak_bytes"], "phase": phase, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    parser.add_argument("--tokens", type=int, default=512, help="evaluation tokens (default 512)")
    parser.add_argument("--only", help="comma-separated recipes (default: all)")
    args = parser.parse_args()
    recipes = args.only.split(",") if args.only else RECIPES
    print(f"demo model, {args.windows} calibration windows of 512 tokens, checkpoint streamed\n")
    print("| recipe | predicted MB | tracked MB | difference | peak in | command s |")
    print("|---|---|---|---|---|---|")
    for recipe in recipes:
        row = run(recipe, args.windows, args.tokens)
        error = row["predicted"] / row["tracked"] - 1
        print(f"| {recipe} | {row['predicted'] / 1e6:.3f} | {row['tracked'] / 1e6:.3f} | {error:+.4%} | "
              f"{row['phase']} | {row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
