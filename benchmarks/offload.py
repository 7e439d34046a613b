"""Streamed decode at a memory budget: memfit's read-ahead and synchronous streaming against
Accelerate's offload of the same model, side by side.

Each row is its own process (so each peak RSS is its own), run once per round, rounds
interleaved; medians. A row decodes ``--new`` tokens greedily after "Once upon a time", for a
batch of 1 and of 16 copies of the prompt, within a budget of 25% and 50% of the model's weight
bytes:

- memfit: ``memfit generate --max-memory B --prefetch|--no-prefetch --batch N --json`` (read ahead
  by a background thread, or read by the step's threads when reached; the default picks the
  second when the file is in the page cache; the decode rate is
  its ``batch_decode_tokens_per_s``; bytes read per token its ``bytes_read_per_token``);
- Accelerate: ``AutoModelForCausalLM.from_pretrained(dir, device_map="auto", max_memory={"cpu": B},
  offload_folder=tmp)`` and transformers' greedy ``generate``: the layers past the budget are
  offloaded to disk and loaded, synchronously, when reached (its hooks). Its decode rate is
  ``(N * new - N) / (time for new tokens - time for 1 token)``; bytes read per token are those of
  the offloaded modules.

Peak RSS growth is the process's high-water mark (``VmHWM``) minus its RSS just before the model
is read. ``--cold`` drops the weight files from the page cache (``posix_fadvise(DONTNEED)``) before
each run, and runs memfit with ``--no-page-cache``, so every token's streamed layers come from the
disk (Accelerate's offloaded weights, read through the page cache, are cold for its first token only).

Each memfit row also gets the cost model's prediction (`memfit.speed`), from rates measured in the
same run after the rounds, once per batch: the runtime's step with every layer streamed, read when
reached and read ahead (around the page cache with ``--cold``), and the streamed bytes read with T
threads; the prediction for a row is made for the bytes that row streamed and the way it read
them, and its error is against the row's median.

    python benchmarks/offload.py --model demo
    python benchmarks/offload.py --model DIR --budgets 50% --batches 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time"


def drop_cache(paths) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def accelerate_run(model_ref: str, budget: int, batch: int, new: int) -> dict:
    """One Accelerate row, in this process (called as ``--accelerate-row``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from memfit.io import _weight_files, load_tokenizer
    from memfit.memory.rss import lifetime_peak_rss_bytes, rss_bytes

    directory = _weight_files(model_ref)[0].parent
    tokenizer = load_tokenizer(model_ref)
    ids = tokenizer([PROMPT] * batch, return_tensors="pt")
    baseline = rss_bytes()
    with tempfile.TemporaryDirectory() as folder:
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="auto", max_memory={"cpu": budget},
                                                     offload_folder=folder, dtype=torch.float32).eval()
        placement = getattr(model, "hf_device_map", {})
        offloaded = [name for name, where in placement.items() if where == "disk"]
        read = sum(p.numel() * p.element_size() for name, module in model.named_modules() if name in offloaded
                   for p in module.parameters(recurse=True))
        with torch.inference_mode():
            times = {}
            for count in (1, new):
                began = time.perf_counter()
                out = model.generate(**ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
                times[count] = time.perf_counter() - began
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    rate = (batch * new - batch) / (times[new] - times[1])
    return {"decode_tokens_per_s": rate, "rss_growth": lifetime_peak_rss_bytes() - baseline,
            "bytes_read_per_token": read, "text": text, "offloaded_modules": len(offloaded)}


def memfit_run(model_ref: str, budget: int, batch: int, new: int, prefetch: bool, prompts: Path,
               cold: bool = False) -> dict:
    command = [sys.executable, "-m", "memfit.cli.main", "generate", "--model", model_ref, "--prompt-file",
               str(prompts), "--batch", str(batch), "--max-new-tokens", str(new), "--max-memory", str(budget),
               "--json"]
    command.append("--prefetch" if prefetch else "--no-prefetch")
    if cold:
        command.append("--no-page-cache")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        line = done.stderr.strip().splitlines()[-1]
        needs = re.search(r"needs .* \((\d+) bytes", line)
        return {"error": f"needs {int(needs[1]):,} B" if needs else line}
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {"decode_tokens_per_s": data["batch_decode_tokens_per_s"],
            "rss_growth": data["peak_rss_bytes"] - data["baseline_rss_bytes"],
            "bytes_read_per_token": data["bytes_read_per_token"], "text": data["texts"][0],
            "tracked_peak_bytes": data["tracked_peak_bytes"], "read_ahead": data["placement"]["read_ahead"],
            "resident_bytes": data["placement"]["resident_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budgets", default="25%,50%")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--accelerate-row", nargs=3, metavar=("BUDGET", "BATCH", "NEW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accelerate_row:
        budget, batch, new = map(int, args.accelerate_row)
        print(json.dumps(accelerate_run(args.model, budget, batch, new)))
        return

    from memfit.io import stored_tensors
    from memfit.units import parse_budget

    stored = stored_tensors(args.model)
    total = sum(t.nbytes for t in stored.values())
    files = sorted({str(t.path) for t in stored.values()})
    rows = []
    for text in args.budgets.split(","):
        budget = parse_budget(text, total)
        for batch in map(int, args.batches.split(",")):
            for kind in ("memfit read-ahead", "memfit synchronous", "accelerate offload"):  # --prefetch, --no-prefetch
                rows.append((text, budget, batch, kind))
    results: dict[tuple, list[dict]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        for round_ in range(args.rounds):
            for row in rows:
                text, budget, batch, kind = row
                prompts.write_text((PROMPT + "\n") * batch)
                if args.cold:
                    drop_cache(files)
                if kind == "accelerate offload":
                    done = subprocess.run([sys.executable, __file__, "--model", args.model, "--accelerate-row",
                                           str(budget), str(batch), str(args.new)], capture_output=True, text=True)
                    result = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                              else {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
                    if "error" in result and (Path(args.model) / "memfit.json").exists():
                        result["error"] = f"Accelerate cannot load memfit's packed format ({result['error']})"
                else:
                    result = memfit_run(args.model, budget, batch, args.new, kind.endswith("read-ahead"), prompts,
                                        args.cold)
                results[row].append(result)
                print(f"round {round_ + 1}: {text} batch {batch} {kind}: "
                      f"{result.get('decode_tokens_per_s', result.get('error'))}", file=sys.stderr, flush=True)
    from memfit.io import load_tokenizer
    from memfit.speed import measure

    prompt_tokens = len(load_tokenizer(args.model)(PROMPT)["input_ids"])
    rates = {batch: measure(args.model, batch=batch, prompt_tokens=prompt_tokens, new_tokens=args.new, cold=args.cold)
             for batch in sorted({row[2] for row in rows})}
    for batch, rate in rates.items():
        print(f"cost model rates at batch {batch}: {json.dumps(rate.as_dict())}", file=sys.stderr)
    print(f"{args.model}: {total:,} weight bytes; {args.new} new tokens after {PROMPT!r}; {args.rounds} interleaved "
          f"rounds, medians; page cache {'dropped before each run' if args.cold else 'warm'}\n")
    print("| budget | batch | row | decode tok/s | predicted tok/s | error | vs synchronous | vs Accelerate | "
          "peak RSS growth MB | read per token MB | same text as memfit read-ahead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text, budget, batch, kind in rows:
        runs = [r for r in results[text, budget, batch, kind] if "error" not in r]
        if not runs:
            error = results[text, budget, batch, kind][0]["error"]
            print(f"| {text} | {batch} | {kind} | refused: {error} | | | | | | | |")
            continue
        rate = statistics.median(r["decode_tokens_per_s"] for r in runs)

        def median_rate(other):
            ok = [r["decode_tokens_per_s"] for r in results[text, budget, batch, other] if "error" not in r]
            return statistics.median(ok) if ok else None

        sync, acc = median_rate("memfit synchronous"), median_rate("accelerate offload")
        ref = next((r["text"] for r in results[text, budget, batch, "memfit read-ahead"] if "error" not in r), None)
        ratio = lambda other: f"{rate / other:.2f}x" if other else "-"  # noqa: E731
        predicted = error = ""
        if kind.startswith("memfit"):
            step = rates[batch].step_s(runs[0]["bytes_read_per_token"], read_ahead=runs[0]["read_ahead"])
            predicted, error = f"{batch / step:.1f}", f"{batch / step / rate - 1:+.0%}"
        print(f"| {text} | {batch} | {kind} | {rate:.1f} | {predicted} | {error} | {ratio(sync)} | {ratio(acc)} | "
              f"{statistics.median(r['rss_growth'] for r in runs) / 1e6:.1f} | "
              f"{runs[0]['bytes_read_per_token'] / 1e6:.1f} | {runs[0]['text'] == ref} |")


if __name__ == "__main__":
    main()
