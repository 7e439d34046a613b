"""``memfit compress``: apply a recipe to a model, measure it, and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from memfit.cli import console, options
from memfit.export import FORMATS

EPILOG = """\
calibrated recipes read a safetensors model directory layer by layer (streamed);
their peak memory is predicted by running the calibration on fake tensors and printed
before they start (--max-memory caps it); the run itself is tracked

examples:
  memfit compress --model demo --recipe int8 --out smollm2-int8
  memfit compress --model demo --recipe int4-g128,bf16 --out smollm2-int4 --json
  memfit compress --model demo --recipe int4-g128-gptq --format compressed-tensors --out smollm2-w4
  memfit compress --model demo --recipe int8 --format gguf-q8_0 --out smollm2-q8_0.gguf

JSON (last stdout line): {"recipe", "out", "metrics": {the keys of memfit eval},
  "predicted_calibration_bytes": int or null, "calibration_peak_bytes": int or null}
  (the predicted and the tracked peak of applying the recipe; null without calibration)"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="apply a recipe, measure the result and save it",
        description=__doc__.split("``: ")[1], epilog=options.token_help() + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    from memfit.compress import compress
    from memfit.data import read_text
    from memfit.units import parse_bytes

    max_memory = None if args.max_memory is None else parse_bytes(args.max_memory)
    calibration_text = None if args.calibration_text is None else read_text(args.calibration_text)
    with console.progress_bar() as progress:
        result = compress(
            args.model, args.recipe, args.out, fmt=args.format, text=options.eval_text_of(args),
            num_tokens=args.tokens, calibration_text=calibration_text,
            num_calibration_windows=args.calibration_windows, max_memory=max_memory, progress=progress,
            on_prediction=_print_prediction,
        )
    predicted = None if result.predicted_calibration is None else result.predicted_calibration.peak_bytes
    if args.json:
        console.print_json({"recipe": result.plan.recipe, "out": str(args.out), "metrics": result.metrics.to_dict(),
                            "predicted_calibration_bytes": predicted,
                            "calibration_peak_bytes": result.calibration_peak_bytes})
    else:
        console.table(f"memfit compress: {args.model} with {result.plan.recipe} -> {args.out}", ("metric", "value"),
                      console.metrics_rows(result.metrics))
        for note in result.notes:
            console.stdout.print(f"note: {note}")
    return 0


def _print_prediction(predicted, windows: int, window: int, streamed: bool) -> None:
    from memfit.units import format_bytes

    parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in predicted.parts.items() if n)
    line = (f"calibration: {windows} windows of {window} tokens, {'streamed' if streamed else 'model loaded'}; "
            f"predicted peak {format_bytes(predicted.peak_bytes)} in {predicted.phase} ({parts})")
    console.stderr.print(line, soft_wrap=True)  # one line, whatever the terminal's width
