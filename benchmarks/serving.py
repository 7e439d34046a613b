"""Serving memory and load time: memfit's saved int8 and int4-g128 demo models against llama.cpp.

1. Load time: `memfit.load` of the saved int4-g128 and int8 directories, in one process,
   interleaved rounds, medians, and their ratio.
2. RSS growth of a whole generation, each in its own process: ``memfit generate --json`` with its
   native step (the default), its compiled step (``--no-native``, after a first run has filled
   inductor's cache) and its eager one (``--no-native --no-compile``): peak RSS minus
   ``baseline_rss_bytes`` (the process with the tokenizer loaded, just before the weights are
   read), and the same plus the tokenizer (``tokenizer_rss_bytes``); and llama.cpp
   (llama-cpp-python) on the Q8_0 and Q4_0 files benchmarks/runtime.py made: peak RSS minus the
   RSS after ``import llama_cpp`` (its vocabulary is read with the model, so it is in the growth),
   for the same 32 new tokens after the same prompt. All against the packed weight bytes plus the
   KV cache.

    python benchmarks/serving.py --int8 DIR --int4 DIR [--gguf-dir DIR]

The directories come from ``memfit compress --model demo --recipe int8 --out DIR`` (and
``int4-g128``); the GGUF files from a run of benchmarks/runtime.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Once upon a time"
NEW = 32

LLAMA_CHILD = """
import json, sys
from memfit.memory.rss import lifetime_peak_rss_bytes, rss_bytes
import llama_cpp
baseline = rss_bytes()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0)
peak = lifetime_peak_rss_bytes()  # VmHWM: ru_maxrss would carry this benchmark's own peak across exec
meta = {k.split(".", 1)[1]: int(v) for k, v in llm.metadata.items() if k.startswith("llama.") and v.isdigit()}
kv = 2 * meta["block_count"] * 256 * meta["attention.key_length"] * meta["attention.head_count_kv"] * 2  # f16, n_ctx
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "kv_cache_bytes": kv,
                  "new_tokens": out["usage"]["completion_tokens"]}))
"""


def load_times(int8: Path, int4: Path, rounds: int) -> dict[str, float]:
    import memfit

    times: dict[str, list[float]] = {"int8": [], "int4-g128": []}
    memfit.load(int8), memfit.load(int4)  # warm the page cache and the imports
    for _ in range(rounds):
        for name, path in (("int8", int8), ("int4-g128", int4)):
            began = time.perf_counter()
            memfit.load(path)
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def memfit_growth(path: Path, step: str) -> dict:
    flags = {"native": [], "compiled": ["--no-native"], "eager": ["--no-native", "--no-compile"]}[step]
    command = [sys.executable, "-m", "memfit.cli.main", "generate", "--model", str(path), "--prompt", PROMPT,
               "--max-new-tokens", str(NEW), "--json", *flags]
    if step == "compiled":  # fill inductor's cache first: the figure is a second start's
        subprocess.run(command, capture_output=True, check=True)
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert result["decode_step"] == step, result["decode_step"]
    return {"growth": result["peak_rss_bytes"] - result["baseline_rss_bytes"],
            "tokenizer": result["tokenizer_rss_bytes"], "held": result["weight_bytes"] + result["kv_cache_bytes"],
            "baseline": result["baseline_rss_bytes"]}


def llama_growth(path: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(path), PROMPT, str(NEW)], capture_output=True,
                           text=True, check=True)
    result = json.loads(child.stdout.splitlines()[-1])
    return {"growth": result["peak_rss_bytes"] - result["baseline_rss_bytes"], "tokenizer": 0,
            "held": path.stat().st_size + result["kv_cache_bytes"], "baseline": result["baseline_rss_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--int4", type=Path, required=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    parser.add_argument("--gguf-dir", type=Path, default=cache / "memfit" / "bench-gguf" / "demo")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    times = load_times(args.int8, args.int4, args.rounds)
    print(f"load ({args.rounds} interleaved rounds, medians): int8 {times['int8']:.3f} s, int4-g128 "
          f"{times['int4-g128']:.3f} s, int4 / int8 = {times['int4-g128'] / times['int8']:.2f}x")
    print()
    print("| run | baseline MB | growth MB | weights + KV MB | growth / (weights + KV) | tokenizer MB "
          "| (growth + tokenizer) / (weights + KV) |")
    print("|---|---|---|---|---|---|---|")
    formats = (("int8", args.int8), ("int4-g128", args.int4))
    rows = [(f"memfit {name} {step}", lambda p=path, s=step: memfit_growth(p, s))
            for name, path in formats for step in ("native", "compiled", "eager")]
    rows += [(f"llama.cpp {t}", lambda t=t: llama_growth(args.gguf_dir / f"model-{t}.gguf")) for t in ("Q8_0", "Q4_0")
             if (args.gguf_dir / f"model-{t}.gguf").exists()]
    for name, measure in rows:
        r = measure()
        tokenizer = f"{r['tokenizer'] / 1e6:.0f}" if r["tokenizer"] else "in the growth"
        print(f"| {name} | {r['baseline'] / 1e6:.0f} | {r['growth'] / 1e6:.0f} | {r['held'] / 1e6:.0f} | "
              f"{r['growth'] / r['held']:.2f}x | {tokenizer} | {(r['growth'] + r['tokenizer']) / r['held']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
