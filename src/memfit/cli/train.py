"""``memfit train``: fine-tune a causal LM on text under a memory budget, with every byte tracked."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from memfit.cli import console, options

EPILOG = """\
recipe tokens (comma-separated; any weight recipe of memfit compress also works, e.g. int4-g128):
  adamw (default), adamw-8bit, adafactor, sgd      optimizer (8-bit: block-wise quantized moments)
  bf16-autocast, fp16-autocast                      forward in bf16/fp16, fp32 weights
  bf16-master                                       bf16 weights, fp32 master copies in the optimizer
  checkpointing, checkpointing-K                    recompute activations of every (K-th) layer
  lora-R, lora-R-aA                                 LoRA adapters of rank R (alpha A, default 2R); the
                                                    rest frozen. On int8/int4 bases: QLoRA-style
  grad-accum-N                                      N micro-batches per step (--budget picks N itself)
  ddp, fsdp                                         data-parallel or sharded processes (with --nproc)

examples:
  memfit train --model demo --steps 50 --batch 2 --seq 256 --recipe lora-8 --out tuned
  memfit train --model demo --recipe int4-g128,lora-8 --batch 8 --budget 1.5GiB --json
  memfit train --model demo --recipe fsdp,adamw-8bit --nproc 2 --steps 20 --batch 4
  memfit train --model demo --out tuned --save-every 25 --resume     # continue a killed run

Several machines: run torchrun on each, e.g. torchrun --nnodes 2 --nproc-per-node 8 \\
  --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m memfit.cli.main train --recipe fsdp ...
(checkpoints then need a shared filesystem under --out).

JSON (last stdout line): {"losses": [per step], "peak_bytes" (one per rank with --nproc),
"tokens_per_s", "out", "recipe"}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model on text under a memory budget",
        description="Fine-tune a causal LM on next-token prediction, tracking every allocation; "
                    "prints the losses, tokens/s and the tracked peak.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    add_training(parser, recipe_help="strategies, comma-separated (see below)")
    parser.add_argument("--budget", metavar="B",
                        help="bytes one process may hold (2GiB): picks the micro-batch by prediction")
    parser.set_defaults(run=run)


def add_training(parser: argparse.ArgumentParser, recipe_help: str) -> None:
    """The options of a training run (`memfit train`, `memfit distill`)."""
    parser.add_argument("--data", default="builtin", metavar="FILE",
                        help="UTF-8 text to train on, or 'builtin' (the built-in calibration half; default)")
    parser.add_argument("--steps", type=options.positive_int, default=100, metavar="N",
                        help="optimizer steps (default 100)")
    parser.add_argument("--batch", type=options.positive_int, default=8, metavar="B",
                        help="sequences per step, over all processes and micro-batches (default 8)")
    parser.add_argument("--seq", type=options.positive_int, default=256, metavar="S",
                        help="tokens per sequence (default 256)")
    parser.add_argument("--recipe", default="none", metavar="R", help=recipe_help)
    parser.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 1e-4; 1e-3 with LoRA)")
    parser.add_argument("--nproc", type=options.positive_int, default=1, metavar="N",
                        help="processes on this machine, started through torchrun (default 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="seed of data order and adapters (default 0)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write the model to DIR/model and checkpoints to DIR/checkpoints")
    parser.add_argument("--save-every", type=int, default=0, metavar="K",
                        help="checkpoint every K steps, in the background (default: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    options.add_json(parser)


def run(args: argparse.Namespace) -> int:
    from memfit.train import distributed

    if args.nproc > 1 and not distributed.under_torchrun():
        check(args, str(args.model))
        return distributed.launch(child_argv(args.raw_argv, "train"), args.nproc, "train")
    from memfit.train.loop import train

    main_rank = os.environ.get("RANK", "0") == "0"
    with progress(main_rank) as (on_step, on_work):
        result = train(
            str(args.model), data=args.data, steps=args.steps, batch=args.batch, seq=args.seq, recipe=args.recipe,
            lr=args.lr, budget=args.budget, seed=args.seed, out=args.out, resume=args.resume,
            save_every=args.save_every, device=args.device, progress=on_step, work_progress=on_work,
        )
    if main_rank:
        report(result, f"memfit train: {args.model}", args.json)
    return 0


def report(result, title: str, as_json: bool, extra: dict | None = None) -> None:
    """Print a training run's result: a table (plus ``extra``'s rows), or its JSON as the last line."""
    if as_json:
        console.print_json(result.to_json())
        return
    from memfit.units import format_bytes

    rows = [
        ("recipe", result.plan.recipe),
        ("steps", str(len(result.losses))),
        ("loss (first -> last)", f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}"),
        ("tokens/s", f"{result.tokens_per_s:.0f}"),
        *[(f"tracked peak (rank {r})" if len(result.peak_bytes) > 1 else "tracked peak", format_bytes(p))
          for r, p in enumerate(result.peak_bytes)],
        ("saved to", str(result.out) if result.out else "-"),
        *[(key, str(value)) for key, value in (extra or {}).items()],
    ]
    console.table(title, ("", "value"), rows)


def check(args: argparse.Namespace, model: str) -> None:
    """Reject bad input before starting processes (each would report it, with torchrun's traceback)."""
    from memfit.data import read_text
    from memfit.models.refs import resolve_loadable
    from memfit.plan import Plan
    from memfit.train.distributed import device_type
    from memfit.train.loop import check_run_dir
    from memfit.workload import Mode, Workload

    plan = Plan.parse(args.recipe)
    plan.run.split(Workload(mode=Mode.TRAIN, batch_size=args.batch, seq_len=args.seq, ranks=args.nproc))
    device_type(args.device)
    if args.data != "builtin":
        read_text(args.data)
    resolve_loadable(model)
    check_run_dir(args.out, args.resume)
    if args.budget is not None:
        from memfit.units import parse_bytes

        parse_bytes(args.budget)


def child_argv(argv: list[str], command: str) -> list[str]:
    """The arguments after ``command``, without ``--nproc`` (the children are the processes)."""
    rest = argv[argv.index(command) + 1:]
    out, skip = [], False
    for item in rest:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


@contextlib.contextmanager
def progress(show: bool):
    """Progress bars on stderr (rank 0 only): ``(on_step, on_work)``, the training steps with the
    loss, tokens/s and tracked peak, and work before them (calibrated recipes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from memfit.units import format_bytes

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console.stderr, disable=not (show and console.stderr.is_terminal),
    ) as bar:
        tasks: dict[str, int] = {}

        def on_work(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total, status="")
            bar.update(tasks[description], completed=done, total=total)

        def on_step(info) -> None:
            status = f"loss {info.loss:.4f} · {info.tokens_per_s:,.0f} tok/s · peak {format_bytes(info.peak_bytes)}"
            if "steps" not in tasks:
                tasks["steps"] = bar.add_task("train", total=info.steps, status=status)
            bar.update(tasks["steps"], completed=info.step, status=status)

        yield on_step, on_work
