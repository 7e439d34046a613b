"""``memfit optimize``: find the plan that fits a budget with the least loss, apply it and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from memfit.cli import console, options

EPILOG = """\
The budget is for the model's weights: bytes (60MB, 1.5GiB) or a share of the original (25%).
Every candidate plan's bytes are predicted without computing; those that fit are applied to a
copy, evaluated (perplexity, bytes, tokens/s), and the lowest perplexity wins (ties: faster decode).

examples:
  memfit optimize --model demo --budget 30% --out memfit-out
  memfit optimize --model demo --budget 80MB --max-ppl-increase 40 --out small --json

JSON (last stdout line): {"budget_bytes", "plan", "out", "metrics": {...},
"candidates": [{"plan", "predicted_weight_bytes", "fits", "metrics" (null if not evaluated),
"skipped" (why a plan that fits was not evaluated: pruning or low-rank factors are tried only
where the same plan without them does not fit)}]}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "optimize", help="search for the best plan under a memory budget, apply it and save it",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    parser.add_argument("--budget", required=True, metavar="B", help="weight budget: 60MB, 1.5GiB or 25%%")
    parser.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                        help="reject plans whose perplexity rises more than PCT percent")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (model + report)")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write the report here (FILE.html and FILE.md); it is always in DIR")
    options.add_eval(parser)
    options.add_calibration(parser)
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.io import check_output_dir, load, save
    from memfit.planner.report import candidate_rows, write_reports
    from memfit.planner.search import optimize

    check_output_dir(args.out)
    text = options.eval_text_of(args)
    model, tokenizer = load(args.model)
    limit = None if args.max_ppl_increase is None else args.max_ppl_increase / 100
    with console.progress_bar() as progress:
        custom = args.calibration_text is not None or args.calibration_windows != options.CALIBRATION_WINDOWS
        calibration = options.calibration_of(args, tokenizer) if custom else None  # else made if needed
        result = optimize(model, tokenizer, args.budget, max_quality_loss=limit, text=text,
                          num_tokens=args.tokens, calibration=calibration, progress=progress)
    reports = write_reports(result)
    save(result.model, tokenizer, args.out, extra_files=reports, notes=result.best.notes)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        for name, content in reports.items():
            args.report.with_suffix(Path(name).suffix).write_text(content)
    best = result.best
    if args.json:
        console.print_json({
            "budget_bytes": result.budget_bytes,
            "plan": best.plan.recipe,
            "out": str(args.out),
            "metrics": best.metrics.to_dict(),
            "candidates": [c.to_dict() for c in result.candidates],
        })
    else:
        header = ("plan", "predicted", "measured", "fits", "perplexity", "change", "decode tok/s")
        console.table(f"memfit optimize: {args.model}, budget {args.budget}", header, candidate_rows(result))
        console.stdout.print(f"chosen: {best.plan.recipe} -> {args.out} (report: {args.out / 'report.html'})")
    return 0
