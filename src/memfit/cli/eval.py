"""``memfit eval``: measure a model's perplexity, weight bytes, peak memory and speed."""

from __future__ import annotations

import argparse

from memfit.cli import console, options

EPILOG = """\
examples:
  memfit eval --model demo
  memfit eval --model ./smollm2-int8 --json
  memfit eval --model tiny-llama --text notes.txt --tokens 4096

Speeds are memfit's runtime (what `memfit generate` runs): prefill is a 512-token prompt to its first
token; decode is 64 greedy steps after a 32-token prompt, batch 1, with the native decode step
(memfit's C library) where it runs the model; for other formats the eager step, or with --compile
the compiled one (`memfit generate`'s choice for them; compiling takes tens of seconds).

JSON (last stdout line): {"perplexity", "eval_tokens", "weight_bytes", "peak_rss_bytes",
"prefill_tokens_per_s", "decode_tokens_per_s"}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure perplexity, weight bytes, peak memory and tokens/s",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    options.add_eval(parser)
    parser.add_argument("--compile", action="store_true",
                        help="where the native step does not run the model, time the compiled decode step "
                             "(memfit generate's) instead of the eager one")
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.evaluate import evaluate
    from memfit.io import load

    text = options.eval_text_of(args)
    model, tokenizer = load(args.model)
    with console.progress_bar() as progress:
        metrics = evaluate(model, tokenizer, text=text, num_tokens=args.tokens, compile=args.compile,
                           progress=progress)
    if args.json:
        console.print_json(metrics.to_dict())
    else:
        console.table(f"memfit eval: {args.model}", ("metric", "value"), console.metrics_rows(metrics))
    return 0
