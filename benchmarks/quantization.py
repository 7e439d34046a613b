"""Every quantization method on the demo model, and the peer libraries installed, in one table.

For each memfit recipe: perplexity and its change, bytes held and bits per weight (scales, zero
points, embedding and norms counted: held bytes x 8 / parameters), quantization time, the tracked
peak while quantizing (and, for calibrated recipes, the peak predicted before starting), prefill
and decode tokens/s at batch 1 and their ratio to fp32. Peer configurations
(benchmarks/peers.py: torchao, optimum-quanto, hqq, where installed) are measured on the same
evaluation tokens. Each row runs in its own process, one after the other; the table then checks
that memfit's Pareto front (bytes held, perplexity) dominates every peer row, and plots both.

    .venv/bin/python benchmarks/quantization.py --jsonl quant.jsonl [--tokens 4096] [--only int8,w8a8]
    .venv/bin/python benchmarks/quantization.py --table quant.jsonl [--plot docs/quantization-pareto.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES = (
    "fp32", "bf16", "int8", "int8-gptq", "w8a8", "w8a8-smooth", "fp8",
    "int4-g32", "int4-g64", "int4-g128", "int4-g128-awq", "int4-g128-gptq", "int4-g128-awq-gptq",
    "int4-g64-gptq", "int4-g32-gptq", "mixed-bits-5", "mixed-bits-6", "mixed-bits-12",
)
HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-3  # perplexity within 0.1% counts as no higher


def measure_recipe(model_ref: str, recipe: str, tokens: int, extra=None) -> dict:
    """Quantize ``model_ref`` with ``recipe`` (streamed when calibrated) and measure it;
    ``extra(model)`` may add figures to the row."""
    import memfit
    from memfit.compress import predict_calibration_memory
    from memfit.data import calibration_windows
    from memfit.io import load
    from memfit.memory.tracker import track
    from memfit.models.load import load_lazy

    plan = memfit.Plan() if recipe == "fp32" else memfit.Plan.parse(recipe)
    predicted = None
    start = time.perf_counter()
    lazy = load_lazy(model_ref) if plan.needs_calibration else None
    if plan.needs_calibration:
        model, tokenizer, source = lazy if lazy is not None else (*load(model_ref), None)
        calibration = calibration_windows(tokenizer)
        predicted = predict_calibration_memory(model, plan, calibration, source=source).peak_bytes
        with track(None if source is not None else model) as tracker:
            memfit.apply(model, plan, memfit.Context(calibration=calibration, source=source))
            if source is not None:
                source.materialize(model)
    else:
        model, tokenizer = load(model_ref)
        with track(model) as tracker:
            memfit.apply(model, plan)
    seconds = time.perf_counter() - start
    peak = tracker.report().peak_bytes
    params = sum(p.numel() for p in load(model_ref)[0].parameters())
    metrics = memfit.evaluate(model, tokenizer, num_tokens=tokens)
    return {
        "library": "memfit", "name": recipe, "perplexity": metrics.perplexity, "held_bytes": metrics.weight_bytes,
        "bits_per_weight": 8 * metrics.weight_bytes / params, "quantize_s": seconds, "peak_bytes": peak,
        "predicted_peak_bytes": predicted, "prefill_tokens_per_s": metrics.prefill_tokens_per_s,
        "decode_tokens_per_s": metrics.decode_tokens_per_s, "eval_tokens": metrics.eval_tokens, "error": None,
        **(extra(model) if extra else {}),
    }


def run_all(args: argparse.Namespace) -> None:
    recipes = args.only.split(",") if args.only else list(RECIPES)
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for recipe in recipes:
        print(f"memfit {recipe} ...", file=sys.stderr)
        child = [sys.executable, __file__, "--child", recipe, "--model", args.model, "--tokens", str(args.tokens)]
        if args.threads:
            child += ["--threads", str(args.threads)]
        out = subprocess.run(child, capture_output=True, text=True, env=env)
        row = _last_json(out.stdout) or {"library": "memfit", "name": recipe, "error": out.stderr.strip()[-300:]}
        _append(args.jsonl, row)
    if args.peers:
        listing = subprocess.run([sys.executable, str(HERE / "peers.py"), "--list"], capture_output=True, text=True)
        names = [line[:42].strip() for line in listing.stdout.splitlines() if line.strip()]
        for name in names:
            print(f"peer {name} ...", file=sys.stderr)
            child = [sys.executable, str(HERE / "peers.py"), "--model", args.model, "--tokens", str(args.tokens),
                     "--config", name]
            if args.threads:
                child += ["--threads", str(args.threads)]
            out = subprocess.run(child, capture_output=True, text=True, env=env)
            row = _last_json(out.stdout) or {"library": "peer", "name": name, "error": out.stderr.strip()[-300:]}
            params = None
            if row.get("held_bytes"):
                params = _params(args.model)
                row["bits_per_weight"] = 8 * row["held_bytes"] / params
            _append(args.jsonl, row)


def _params(model_ref: str) -> int:
    from memfit.io import load

    return sum(p.numel() for p in load(model_ref)[0].parameters())


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def render(rows: list[dict]) -> str:
    """The Markdown table, ratios to the fp32 row, and the Pareto verdict for each peer row."""
    base = next(r for r in rows if r["library"] == "memfit" and r["name"] == "fp32")
    num = lambda v, fmt: "—" if v is None else format(v, fmt)
    ratio = lambda r, key: None if r.get(key) is None or not base.get(key) else r[key] / base[key]
    header = ("library", "method", "perplexity", "change", "held MB", "bits/weight", "quantize s",
              "peak MB (predicted)", "prefill tok/s", "x fp32", "decode tok/s", "x fp32")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    ok = [r for r in rows if r.get("perplexity") is not None and r.get("held_bytes") is not None]
    for r in sorted(ok, key=lambda r: (r["library"] != "memfit", r["held_bytes"])):
        peak = num(r.get("peak_bytes") and r["peak_bytes"] / 1e6, ".0f")
        if r.get("predicted_peak_bytes"):
            peak += f" ({r['predicted_peak_bytes'] / 1e6:.0f})"
        change = 100 * (r["perplexity"] / base["perplexity"] - 1)
        cells = (
            r["library"], r["name"], f"{r['perplexity']:.3f}", f"{change:+.2f}%", f"{r['held_bytes'] / 1e6:.1f}",
            num(r.get("bits_per_weight"), ".2f"), num(r.get("quantize_s"), ".1f"), peak,
            num(r.get("prefill_tokens_per_s"), ".0f"), num(ratio(r, "prefill_tokens_per_s"), ".2f"),
            num(r.get("decode_tokens_per_s"), ".1f"), num(ratio(r, "decode_tokens_per_s"), ".2f"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r not in ok]
    for r in failed:
        lines.append(f"\n{r['library']} {r['name']}: not measured ({r.get('error')})")
    lines.append("")
    lines += pareto_verdicts(ok)
    return "\n".join(lines)


def pareto_verdicts(rows: list[dict]) -> list[str]:
    """For each peer row, the memfit row holding no more bytes with perplexity no higher (0.1%)."""
    ours = [r for r in rows if r["library"] == "memfit"]
    out, beaten = [], 0
    peers = [r for r in rows if r["library"] != "memfit"]
    for peer in sorted(peers, key=lambda r: r["held_bytes"]):
        better = [r for r in ours if r["held_bytes"] <= peer["held_bytes"]
                  and r["perplexity"] <= peer["perplexity"] * (1 + TOLERANCE)]
        if better:
            best = min(better, key=lambda r: r["held_bytes"])
            beaten += 1
            out.append(f"- {peer['name']} ({peer['held_bytes'] / 1e6:.1f} MB, {peer['perplexity']:.3f}): dominated by "
                       f"memfit {best['name']} ({best['held_bytes'] / 1e6:.1f} MB, {best['perplexity']:.3f})")
        else:
            out.append(f"- {peer['name']} ({peer['held_bytes'] / 1e6:.1f} MB, {peer['perplexity']:.3f}): NOT dominated")
    out.insert(0, f"Pareto: memfit dominates {beaten} of {len(peers)} peer configurations.")
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for library, marker in (("memfit", "o"), ("torchao", "s"), ("optimum-quanto", "^"), ("hqq", "D")):
        points = sorted((r["held_bytes"] / 1e6, r["perplexity"], r["name"]) for r in rows
                        if r["library"] == library and r.get("perplexity") is not None)
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=library)
        front, best = [], float("inf")
        for x, y, _ in points:
            if y < best:
                front.append((x, y))
                best = y
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", alpha=0.5)
    ax.set_xlabel("bytes held (MB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity against bytes held (lower left is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (whole 512-token windows)")
    parser.add_argument("--only", help="comma-separated memfit recipes (default: all of RECIPES)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the peer libraries")
    parser.add_argument("--jsonl", default="quantization.jsonl", help="append results here")
    parser.add_argument("--table", help="render the table of a JSONL file and exit")
    parser.add_argument("--plot", help="with --table: also save the Pareto plot (PNG) here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_recipe(args.model, args.child, args.tokens)))
    elif args.table:
        with open(args.table) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(render(rows))
        if args.plot:
            plot([r for r in rows if r.get("held_bytes")], args.plot)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
