"""Knowledge distillation on the demo model: how much of a student's perplexity gap each way of training closes.

For each student (a recipe applied to the teacher), the same tokens of the built-in calibration
half are trained two ways, each in its own process through the CLI:

- ``plain``: `memfit train` of the student on next-token loss;
- ``kd``: `memfit distill` from the fp32 teacher (full-vocabulary forward KL, chunked);
- ``kd-cache``: the same from a top-64 teacher cache (built first, by one teacher pass over the
  run's windows; the build's time is not in tokens/s), the teacher not loaded while training.

Perplexity is on the evaluation half (disjoint from the training text): the teacher, the student
before training (`memfit compress` of the recipe), and each trained student (`memfit eval`). "gap
closed" is (before - after) / (before - teacher). The tracked peak and tokens/s are the training
runs' own figures (teacher weights included for kd).

``--other-text FILE`` scores every model also on a text unlike the training data (for example
English licence texts: ``cat /usr/share/common-licenses/{GPL-3,Apache-2.0,GFDL-1.3} > FILE``), where
what a student learns of the training text itself does not count.

    .venv/bin/python benchmarks/distill.py                       # drop-layers-6, prune-mlp-25, int4 + LoRA
    .venv/bin/python benchmarks/distill.py --students drop-layers-6 --steps 48
    .venv/bin/python benchmarks/distill.py --steps 8 --other-text licences.txt
    .venv/bin/python benchmarks/distill.py --part memory --teacher-int8 DIR

``--part memory``: a distillation step's predicted peak (`memfit.train.distill.estimate_distill`,
fake tensors) against the peak `memfit.distill` tracks over 3 real steps, for the teacher in
memory in fp32, an int8 teacher (``DIR``: `memfit compress --model demo --recipe int8 --out DIR`),
and a top-64 teacher cache, beside a plain training step of the same student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STUDENTS = "drop-layers-6;prune-mlp-25;int4-g128-gptq,lora-8"
LORA_LR = 1e-3


def memfit(*args: str) -> dict:
    """Run ``memfit ARGS --json``; its JSON line (exits on failure, with its stderr)."""
    done = subprocess.run([sys.executable, "-m", "memfit.cli.main", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"memfit {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def perplexity(model: str, tokens: int, text: str | None = None) -> float:
    return memfit("eval", "--model", model, "--tokens", str(tokens), *(("--text", text) if text else ()))["perplexity"]


def memory(args: argparse.Namespace) -> None:
    import memfit
    from memfit.train.distill import distill, estimate_distill
    from memfit.workload import Mode, Workload

    student, batch, seq = args.students.split(";")[0], args.batch, args.seq
    workload = Workload(mode=Mode.TRAIN, batch_size=batch, seq_len=seq)
    print(f"{args.model} -> {student}: a step at batch {batch}, seq {seq}, AdamW; tracked over 3 steps\n")
    print("| teacher | predicted peak | tracked peak | difference | vs plain training | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    plain = memfit.train(args.model, steps=3, batch=batch, seq=seq, recipe=student, device="cpu")
    predicted = memfit.estimate(args.model, student, workload).peak_bytes
    rows = [("none (plain training)", predicted, plain)]
    with tempfile.TemporaryDirectory() as tmp:
        # the int8 teacher's student is the same fp32 one, saved first (a recipe applies to the teacher's weights)
        saved = f"{tmp}/student"
        if args.teacher_int8:
            memfit.compress(args.model, student, saved)
        for label, teacher, top_k in (("fp32, in memory", args.model, None),
                                      ("int8, in memory", args.teacher_int8, None),
                                      ("top-64 cache", args.model, 64)):
            if teacher is None:
                continue
            cache = {"teacher_cache": f"{tmp}/cache", "top_k": top_k} if top_k else {}
            mine = saved if teacher == args.teacher_int8 else student
            run = distill(teacher, mine, steps=3, batch=batch, seq=seq, device="cpu", **cache)
            rows.append((label, estimate_distill(teacher, mine, workload, top_k=top_k).peak_bytes, run))
    for label, predicted, run in rows:
        tracked = run.peak_bytes[0]
        print(f"| {label} | {predicted / 1e9:.3f} GB | {tracked / 1e9:.3f} GB | "
              f"{(predicted - tracked) / tracked:+.2%} | {tracked / plain.peak_bytes[0]:.2f}x | "
              f"{run.tokens_per_s:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--students", default=STUDENTS, help="recipes, separated by ';'")
    parser.add_argument("--methods", default="plain,kd,kd-cache")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of full-weight students")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--other-text", metavar="FILE",
                        help="also score every model on this text, unlike the training data (columns 'other')")
    parser.add_argument("--other-tokens", type=int, default=8192)
    parser.add_argument("--part", choices=("quality", "memory"), default="quality")
    parser.add_argument("--teacher-int8", metavar="DIR", help="--part memory: an int8 teacher's directory")
    args = parser.parse_args()
    if args.part == "memory":
        memory(args)
        return

    tokens = args.steps * args.batch * args.seq
    teacher = perplexity(args.model, args.eval_tokens)
    print(f"{args.model}: teacher perplexity {teacher:.3f} on {args.eval_tokens:,} evaluation tokens; each run "
          f"{args.steps} steps x {args.batch} x {args.seq} = {tokens:,} training tokens of the calibration half\n",
          flush=True)
    other = args.other_text and perplexity(args.model, args.other_tokens, args.other_text)
    if other:
        print(f"teacher perplexity {other:.3f} on {args.other_tokens:,} tokens of {args.other_text} (other)\n")
    print("| student | training | lr | perplexity before | after | gap closed | tracked peak GB | tokens/s |"
          + (" other before | other after | other gap closed |" if other else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if other else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for index, student in enumerate(args.students.split(";")):
            weights = ",".join(t for t in student.split(",") if not t.startswith("lora"))
            before = memfit("compress", "--model", args.model, "--recipe", weights, "--out", f"{tmp}/s{index}",
                            "--tokens", str(args.eval_tokens))["metrics"]["perplexity"]
            other_before = other and perplexity(f"{tmp}/s{index}", args.other_tokens, args.other_text)
            lr = LORA_LR if "lora" in student else args.lr
            common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--lr", str(lr)]
            for method in args.methods.split(","):
                out = f"{tmp}/s{index}-{method}"
                if method == "plain":
                    run = memfit("train", "--model", args.model, "--recipe", student, "--out", out, *common)
                elif method == "kd":
                    run = memfit("distill", "--teacher", args.model, "--student", student, "--out", out, *common)
                elif method == "kd-cache":
                    run = memfit("distill", "--teacher", args.model, "--student", student, "--out", out, *common,
                                 "--teacher-cache", f"{tmp}/cache", "--top-k", "64")  # one for every student
                else:
                    sys.exit(f"unknown method {method!r}")
                after = perplexity(str(Path(out) / "model"), args.eval_tokens)
                closed = (before - after) / (before - teacher)
                row = (f"| {student} | {method} | {lr:g} | {before:.3f} | {after:.3f} | {closed:.1%} | "
                       f"{run['peak_bytes'] / 1e9:.2f} | {run['tokens_per_s']:.0f} |")
                if other:
                    other_after = perplexity(str(Path(out) / "model"), args.other_tokens, args.other_text)
                    row += (f" {other_before:.3f} | {other_after:.3f} | "
                            f"{(other_before - other_after) / (other_before - other):.1%} |")
                print(row, flush=True)


if __name__ == "__main__":
    main()
