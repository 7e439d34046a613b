"""``memfit compress``: apply a recipe to a model, measure it, and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from memfit.cli import console, options
from memfit.export import FORMATS

EPILOG = """\
recipe tokens (comma-separated, or a .json/.yaml recipe file):
  int8         weight-only int8 per output channel: Linear layers, embedding and head
  int4-gN      weight-only 4-bit, groups of N in {32, 64, 128, 256}, asymmetric;
               embedding and head kept at int8
  int4-gN-gptq, int8-gptq
               the same grids and bytes, codes chosen by GPTQ on calibration text
  int4-gN-awq, int4-gN-awq-gptq
               activation-aware scales folded in before rounding (then RTN or GPTQ)
  w8a8         int8 weights and per-token int8 activations, integer matmuls for
               long inputs (prefill); w8a8-smooth[A]: SmoothQuant smoothing, alpha A
               (default 0.5)
  fp8          float8 (e4m3) weights per output channel
  mixed-bits[-B][-rtn]
               int4, int8 or float per attention/MLP block, chosen by measured
               sensitivity to average B bits per weight (default 5); GPTQ codes,
               or round to nearest with -rtn
  bf16, fp16   cast what is still floating point
calibrated recipes read a safetensors model directory layer by layer (streamed);
their predicted peak memory is printed before they start (--max-memory caps it)

examples:
  memfit compress --model demo --recipe int8 --out smollm2-int8
  memfit compress --model demo --recipe int4-g128,bf16 --out smollm2-int4 --json
  memfit compress --model demo --recipe int4-g128-gptq --format compressed-tensors --out smollm2-w4
  memfit compress --model demo --recipe int8 --format gguf-q8_0 --out smollm2-q8_0.gguf

JSON (last stdout line): {"recipe", "out", "metrics": {the keys of memfit eval},
  "predicted_calibration_bytes": int or null}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="apply a recipe, measure the result and save it",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    parser.add_argument("--recipe", required=True, metavar="R", help="recipe tokens (int8, int4-g128, bf16) or a file")
    parser.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="output directory (a .gguf file for the gguf formats); written atomically")
    parser.add_argument("--format", default="memfit", choices=FORMATS,
                        help="memfit: memfit's own directory (memfit.load rebuilds it exactly); "
                             "compressed-tensors: a directory transformers (with the compressed-tensors "
                             "package) and vLLM load; gguf-*: a llama.cpp file (weights re-rounded to that "
                             "type). Default: memfit")
    options.add_eval(parser)
    options.add_calibration(parser)
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="refuse to start a calibrated recipe whose predicted peak memory exceeds SIZE "
                             "(such as 4GB); the prediction is printed either way")
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.evaluate import evaluate
    from memfit.export import check_target, export
    from memfit.io import check_output_dir, save
    from memfit.models.load import load, load_lazy
    from memfit.plan import Context, Plan, apply
    from memfit.units import parse_bytes

    plan = Plan.parse(args.recipe)  # bad recipes, sizes and outputs fail before anything is loaded or written
    max_memory = None if args.max_memory is None else parse_bytes(args.max_memory)
    if args.format == "memfit":
        check_output_dir(args.out)
    else:
        check_target(args.format, args.out, plan)
    text = options.eval_text_of(args)
    # a calibrated first strategy reads the checkpoint layer by layer: the float model is never whole
    lazy = load_lazy(args.model) if plan.strategies and plan.strategies[0].needs_calibration else None
    model, tokenizer, source = lazy if lazy is not None else (*load(args.model), None)
    calibration = options.calibration_of(args, tokenizer, plan)
    predicted = None
    if calibration is not None:
        predicted = _check_calibration_memory(model, plan, calibration, source is not None, max_memory)
    with console.progress_bar() as progress:
        ctx = Context(progress=progress, calibration=calibration, source=source)
        apply(model, plan, ctx)
        if source is not None:
            source.materialize(model)  # whatever no strategy reached
        metrics = evaluate(model, tokenizer, text=text, num_tokens=args.tokens, progress=progress)
    if args.format == "memfit":
        save(model, tokenizer, args.out, notes=ctx.notes)
    else:
        export(model, tokenizer, args.format, args.out)
    if args.json:
        console.print_json({"recipe": plan.recipe, "out": str(args.out), "metrics": metrics.to_dict(),
                            "predicted_calibration_bytes": predicted})
    else:
        console.table(f"memfit compress: {args.model} with {plan.recipe} -> {args.out}", ("metric", "value"),
                      console.metrics_rows(metrics))
        for note in ctx.notes:
            console.stdout.print(f"note: {note}")
    return 0


def _check_calibration_memory(model, plan, calibration, streamed: bool, max_memory: int | None) -> int:
    """Print the predicted peak of the calibration run; raise `BudgetError` if over ``max_memory``."""
    from memfit.calibration.memory import predict_calibration_memory
    from memfit.errors import BudgetError
    from memfit.units import format_bytes

    windows, window = len(calibration), calibration[0].shape[-1]
    predicted = predict_calibration_memory(model, plan, windows, window, streamed=streamed)
    if max_memory is not None and predicted.peak_bytes > max_memory:
        raise BudgetError(
            f"calibrating {plan.recipe!r} is predicted to need {format_bytes(predicted.peak_bytes)} "
            f"(at {predicted.phase}), more than --max-memory {format_bytes(max_memory)}",
            "raise --max-memory, use fewer --calibration-windows, or choose a recipe without calibration",
        )
    parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in predicted.parts.items() if n)
    console.stderr.print(f"calibration: {windows} windows of {window} tokens, "
                         f"{'streamed' if streamed else 'model loaded'}; predicted peak "
                         f"{format_bytes(predicted.peak_bytes)} at {predicted.phase} ({parts})")
    return predicted.peak_bytes
