"""``memfit compress``: apply a recipe to a model, measure it, and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from memfit.cli import console, options

EPILOG = """\
recipe tokens (comma-separated, or a .json/.yaml recipe file):
  int8         weight-only int8 per output channel: Linear layers, embedding and head
  int4-gN      weight-only 4-bit, groups of N in {32, 64, 128, 256}, asymmetric;
               embedding and head kept at int8
  int4-gN-gptq, int8-gptq
               the same grids and bytes, codes chosen by GPTQ on calibration text
  int4-gN-awq, int4-gN-awq-gptq
               activation-aware scales folded in before rounding (then RTN or GPTQ)
calibrated recipes read a safetensors model directory layer by layer (streamed)
  bf16, fp16   cast what is still floating point

examples:
  memfit compress --model demo --recipe int8 --out smollm2-int8
  memfit compress --model demo --recipe int4-g128,bf16 --out smollm2-int4 --json

JSON (last stdout line): {"recipe", "out", "metrics": {the keys of memfit eval}}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="apply a recipe, measure the result and save it",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    parser.add_argument("--recipe", required=True, metavar="R", help="recipe tokens (int8, int4-g128, bf16) or a file")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (written atomically)")
    options.add_eval(parser)
    options.add_calibration(parser)
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.evaluate import evaluate
    from memfit.io import check_output_dir, save
    from memfit.models.load import load, load_lazy
    from memfit.plan import Context, Plan, apply

    plan = Plan.parse(args.recipe)  # bad recipes fail before anything is loaded or written
    check_output_dir(args.out)
    text = options.eval_text_of(args)
    # a calibrated first strategy reads the checkpoint layer by layer: the float model is never whole
    lazy = load_lazy(args.model) if plan.strategies and plan.strategies[0].needs_calibration else None
    model, tokenizer, source = lazy if lazy is not None else (*load(args.model), None)
    with console.progress_bar() as progress:
        ctx = Context(progress=progress, calibration=options.calibration_of(args, tokenizer, plan), source=source)
        apply(model, plan, ctx)
        if source is not None:
            source.materialize(model)  # whatever no strategy reached
        metrics = evaluate(model, tokenizer, text=text, num_tokens=args.tokens, progress=progress)
    save(model, tokenizer, args.out, notes=ctx.notes)
    if args.json:
        console.print_json({"recipe": plan.recipe, "out": str(args.out), "metrics": metrics.to_dict()})
    else:
        console.table(f"memfit compress: {args.model} with {plan.recipe} -> {args.out}", ("metric", "value"),
                      console.metrics_rows(metrics))
        for note in ctx.notes:
            console.stdout.print(f"note: {note}")
    return 0
