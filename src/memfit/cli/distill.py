"""``memfit distill``: train a smaller or quantized student to match a frozen teacher."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from memfit.cli import train

EPILOG = """\
the student (--student):
  a recipe applied to the teacher's weights, e.g. drop-layers-6, prune-mlp-25, lowrank-mlp-50-act,
  or int4-g128-gptq,lora-8 (the quantized base stays frozen; only the adapters train);
  or a model directory with the teacher's tokenizer.

the loss, at every position (computed 128 positions at a time: neither model's logits are held
for the whole batch):
  kl (default)   KL(teacher || student) on logits divided by --temperature, times its square
  reverse-kl     KL(student || teacher)
  jsd            generalized Jensen-Shannon divergence (mixture weight 0.5)
  --alpha A      A x the divergence + (1 - A) x the plain next-token loss (default 1)
  --hidden-loss cosine|mse   plus --hidden-weight x the distance between each student layer's
                 output and the teacher layer's it came from (a drop-layers student keeps
                 which; other students: the same index, or evenly spaced)

--recipe takes the training tokens of memfit train (optimizer, lora-R, checkpointing, grad-accum-N,
ddp, fsdp).

examples:
  memfit distill --teacher demo --student drop-layers-6 --steps 200 --batch 8 --seq 256 --out small
  memfit distill --teacher demo --student int4-g128-gptq,lora-8 --lr 1e-3 --out int4-kd --json
  memfit distill --teacher demo --student prune-mlp-25 --batch 16 --budget 3GiB   # micro-batch by prediction
  memfit distill --teacher demo --student drop-layers-6 --out small --save-every 50 --resume
  memfit distill --teacher demo --student drop-layers-6 --teacher-cache kd-cache --top-k 64 --out small

the teacher cache (--teacher-cache DIR): the first run stores the teacher's top-K log-probabilities
at every position of its training windows (K = 64: 256 bytes per token) and later runs (and this
one, after building it) train from it without the teacher in memory. A cache built from other
data, another teacher, --seq or --temperature is refused.

JSON (last stdout line): memfit train's ({"losses", "peak_bytes", "tokens_per_s", "out",
"recipe"}) plus "teacher", "loss", "temperature", "alpha", "teacher_cache_bytes_per_token"."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill", help="train a student to match a frozen teacher (knowledge distillation)",
        description="Knowledge distillation: train a student (the teacher under a recipe, or another model "
                    "with its tokenizer) on the teacher's next-token distributions, tracking every "
                    "allocation; prints the losses, tokens/s and the tracked peak (teacher included).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--teacher", required=True, metavar="REF",
                        help="the teacher: any model memfit loads (an int8 teacher holds a quarter of fp32's bytes)")
    parser.add_argument("--student", required=True, metavar="SPEC",
                        help="a recipe applied to the teacher (drop-layers-6), or a model directory")
    train.add_training(parser, recipe_help="training tokens, comma-separated (optimizer, lora-R, checkpointing...)")
    parser.add_argument("--budget", metavar="B",
                        help="bytes one process may hold, teacher included (2GiB): picks the micro-batch by prediction")
    parser.add_argument("--loss", choices=("kl", "reverse-kl", "jsd"), default="kl",
                        help="the divergence from the teacher (default kl)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="divide both models' logits by T (default 1)")
    parser.add_argument("--alpha", type=float, default=1.0, metavar="A",
                        help="the divergence's share of the loss; the rest is next-token loss (default 1)")
    parser.add_argument("--hidden-loss", choices=("cosine", "mse"),
                        help="also match each student layer's output to the teacher layer it came from (drop-layers "
                             "keeps the map; otherwise evenly spaced)")
    parser.add_argument("--hidden-weight", type=float, default=1.0, metavar="W",
                        help="the hidden-state loss's weight (default 1)")
    parser.add_argument("--teacher-cache", type=Path, metavar="DIR",
                        help="store the teacher's top-K log-probabilities in DIR (one teacher pass over the run's "
                             "windows, on first use), then train from them without loading the teacher")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="tokens per position in a new --teacher-cache (default 64: 256 bytes per token)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.train import distributed
    from memfit.train.distill import DistillConfig, Divergence, distill, split_student
    from memfit.train.teacher_cache import prepare_teacher_cache

    config = DistillConfig(Divergence.parse(args.loss), args.temperature, args.alpha, hidden=args.hidden_loss,
                           hidden_weight=args.hidden_weight)  # bad numbers: before loading
    if args.nproc > 1 and not distributed.under_torchrun():
        model, _ = split_student(args.student, args.teacher, args.recipe)
        train.check(args, model)
        if args.teacher_cache is not None:  # built here, once, rather than by every process
            with train.progress(True) as (_, on_work):
                prepare_teacher_cache(args.teacher_cache, args.teacher, data=args.data, seq=args.seq, seed=args.seed,
                                      steps=args.steps, batch=args.batch, temperature=config.temperature,
                                      top_k=args.top_k, device=args.device, progress=on_work)
        return distributed.launch(train.child_argv(args.raw_argv, "distill"), args.nproc, "distill")
    main_rank = os.environ.get("RANK", "0") == "0"
    with train.progress(main_rank) as (on_step, on_work):
        result = distill(
            args.teacher, args.student, data=args.data, steps=args.steps, batch=args.batch, seq=args.seq,
            recipe=args.recipe, loss=config.divergence, temperature=config.temperature, alpha=config.alpha,
            hidden_loss=config.hidden, hidden_weight=config.hidden_weight,
            lr=args.lr, seed=args.seed, out=args.out, resume=args.resume, save_every=args.save_every,
            device=args.device, budget=args.budget, teacher_cache=args.teacher_cache, top_k=args.top_k,
            progress=on_step,
            work_progress=on_work,
        )
    if main_rank:
        cached = result.teacher_cache_bytes_per_token
        train.report(result, f"memfit distill: {args.teacher} -> {args.student}", args.json,
                     {"teacher": args.teacher, "loss": config.divergence.value,
                      "teacher cache": f"{cached} bytes per token" if cached else "-"})
    return 0
