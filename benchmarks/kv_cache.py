"""KV-cache quantization (``kv-int8``, ``kv-int4``) on a real model: cache bytes, perplexity, decode speed.

For the model's own cache and each quantized format:
- cache bytes at the windows' length, and their ratio to an fp16 cache of the same shape;
- perplexity over the evaluation text in windows of ``--window`` tokens, every position's
  logits computed over the cache as stored (`memfit.evaluate.runtime_perplexity`), and its
  change against the model's own cache;
- decode tokens/s of the runtime's compiled step (the path a quantized cache runs on), batch 1,
  greedy, ``--new`` tokens after a ``--prompt``-token prompt; rounds interleaved across the
  formats, medians, and the ratio to the model's own cache in the same run.

    python benchmarks/kv_cache.py --model demo
    python benchmarks/kv_cache.py --model demo --windows 2 --rounds 3 --prompt 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import memfit
from memfit.data import eval_text, token_windows
from memfit.evaluate import runtime_perplexity
from memfit.runtime import Engine, KVFormat
from memfit.runtime.kvcache import cache_bytes_per_layer

FORMATS = (None, KVFormat.INT8, KVFormat.INT4)


def name(format: KVFormat | None) -> str:
    return "model's own" if format is None else format.token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024, help="decode prompt tokens (default 1024)")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = memfit.load(args.model)
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    windows = token_windows(tokenizer, eval_text(), args.windows * args.window, args.window)
    fp16 = layers * cache_bytes_per_layer(None, 1, kv_heads, args.window, head_dim, 2)
    rows = {}
    for format in FORMATS:
        engine = Engine(model, compile=False, native=False, kv_format=format)
        began = time.perf_counter()
        ppl = runtime_perplexity(engine, windows)
        rows[format] = {"format": name(format), "cache_bytes": engine.cache_bytes,
                        "ratio_to_fp16": engine.cache_bytes / fp16, "perplexity": ppl,
                        "perplexity_seconds": time.perf_counter() - began}
        print(json.dumps(rows[format]), flush=True)
    base = rows[None]["perplexity"]
    for row in rows.values():
        row["perplexity_change"] = row["perplexity"] / base - 1

    prompt = windows[0, : args.prompt].tolist()
    engines = {f: Engine(model, compile=True, native=False, kv_format=f) for f in FORMATS}
    for format, engine in engines.items():  # compile (and warm up) each step once, untimed
        for _ in engine.stream([prompt], 8):
            pass
        if not engine.compiled:
            raise SystemExit(f"{name(format)}: the decode step did not compile")
    rates: dict = {f: [] for f in FORMATS}
    for _ in range(args.rounds):
        for format, engine in engines.items():
            steps = engine.stream([prompt], args.new + 1)
            next(steps)  # the prefill's token, untimed
            began = time.perf_counter()
            count = sum(1 for _ in steps)
            rates[format].append(count / (time.perf_counter() - began))
    for format in FORMATS:
        rows[format]["compiled_decode_tokens_per_s"] = statistics.median(rates[format])
        rows[format]["decode_ratio"] = rows[format]["compiled_decode_tokens_per_s"] / statistics.median(rates[None])
    print(f"\n{args.model} ({next(model.parameters()).dtype}), perplexity over {args.windows} windows of "
          f"{args.window} tokens; compiled decode of {args.new} tokens after {args.prompt}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads\n")
    print("| cache | bytes at window | x fp16 | perplexity | change | compiled decode tok/s | x own cache |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows.values():
        print(f"| {row['format']} | {row['cache_bytes']:,} | {row['ratio_to_fp16']:.3f} | {row['perplexity']:.4f} | "
              f"{row['perplexity_change']:+.2%} | {row['compiled_decode_tokens_per_s']:.1f} | "
              f"{row['decode_ratio']:.2f} |")
    print(json.dumps(list(rows.values())))


if __name__ == "__main__":
    main()
