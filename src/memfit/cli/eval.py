"""``memfit eval``: measure a model's perplexity, weight bytes, peak memory and speed."""

from __future__ import annotations

import argparse

from memfit.cli import console, options

STREAMED_CHUNK = 64  # tokens a forward within --max-memory: its logits are [64, vocab] floats

EPILOG = """\
examples:
  memfit eval --model demo
  memfit eval --model ./smollm2-int8 --json
  memfit eval --model tiny-llama --text notes.txt --tokens 4096
  memfit eval --model demo --max-memory 40% --tokens 2048
  memfit eval --model demo --kv-cache int4

Speeds are memfit's runtime (what `memfit generate` runs): prefill is a 512-token prompt to its first
token; decode is 64 greedy steps after a 32-token prompt, batch 1, with the native decode step
(memfit's C library) where it runs the model; for other formats the eager step, or with --compile
the compiled one (`memfit generate`'s choice for them; compiling takes tens of seconds).

JSON (last stdout line): {"perplexity", "eval_tokens", "weight_bytes", "peak_rss_bytes",
"prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache"}

--max-memory B or --kv-cache int8|int4 (by default the format a memfit directory's plan records: memfit
optimize --mode generate may choose one) score the text through memfit's runtime instead (its static
KV cache, every position's logits over the cache as stored), in windows of 512 tokens, 64 tokens a
forward with --max-memory (512 without); speeds are not measured then (null). --max-memory B runs
within B bytes (a size, or a percentage of the weight bytes) as memfit generate --max-memory does:
the decoder layers that do not fit are read from the model's file at each forward, and the budget
counts the weights held, the buffer, the cache and the forward's logits and workspace (predicted on
fake tensors). JSON then adds "max_memory_bytes", "tracked_peak_bytes", "baseline_rss_bytes" and
"placement" (as memfit generate's)."""


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
    parser.add_argument("--max-memory", metavar="B",
                        help="score within B bytes (e.g. 150MB, or 40%% of the weight bytes), streaming the "
                             "decoder layers that do not fit from the model's file")
    options.add_kv_cache(parser, "scores through it")
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.evaluate import evaluate
    from memfit.io import load

    kv_format = options.kv_format_of(args)
    if args.max_memory is not None or kv_format is not None:
        return _run_on_runtime(args, kv_format)
    text = options.eval_text_of(args)
    model, tokenizer = load(args.model)
    with console.progress_bar() as progress:
        metrics = evaluate(model, tokenizer, text=text, num_tokens=args.tokens, compile=args.compile,
                           progress=progress)
    if args.json:
        console.print_json({**metrics.to_dict(), "kv_cache": None})
    else:
        console.table(f"memfit eval: {args.model}", ("metric", "value"), console.metrics_rows(metrics))
    return 0


def _run_on_runtime(args: argparse.Namespace, kv_format) -> int:
    """``--max-memory`` / ``--kv-cache``: perplexity through the runtime (streamed layers, quantized cache)."""
    from memfit.data import eval_text, token_windows
    from memfit.evaluate import WINDOW, runtime_perplexity
    from memfit.io import import_model_code, load, load_tokenizer, stored_tensors
    from memfit.memory import track
    from memfit.memory.report import weight_bytes
    from memfit.memory.rss import lifetime_peak_rss_bytes, rss_bytes
    from memfit.offload import load_streamed
    from memfit.runtime import Engine
    from memfit.units import format_bytes, parse_budget

    text = options.eval_text_of(args)
    tokenizer = load_tokenizer(args.model)
    windows = token_windows(tokenizer, eval_text() if text is None else text, args.tokens, WINDOW)
    placement = streamed = None
    chunk = STREAMED_CHUNK if args.max_memory is not None else WINDOW
    if args.max_memory is not None:
        import_model_code(args.model)
        baseline = rss_bytes()
        budget = parse_budget(args.max_memory, sum(t.nbytes for t in stored_tensors(args.model).values()))
        model, streamed, placement = load_streamed(args.model, budget, prompt_tokens=WINDOW, new_tokens=0,
                                                   kv_format=kv_format, eval_chunk=chunk)
        if not args.json:
            console.stderr.print(f"placement: {placement.describe()}", soft_wrap=True)
    else:
        baseline = rss_bytes()
        model, _ = load(args.model, tokenizer=False)
    engine = Engine(model, compile=False, native=False, streamed=streamed, cache_step=1, kv_format=kv_format)
    with track(model) as tracker, console.progress_bar() as progress:
        tracker.hold(engine.cache_for(1, WINDOW).tensors())
        perplexity = runtime_perplexity(engine, windows, progress, chunk=chunk)
    result = {"perplexity": perplexity, "eval_tokens": windows.numel(), "weight_bytes": weight_bytes(model),
              "peak_rss_bytes": lifetime_peak_rss_bytes(), "prefill_tokens_per_s": None, "decode_tokens_per_s": None,
              "kv_cache": kv_format.token if kv_format else None, "baseline_rss_bytes": baseline}
    if placement is not None:
        result |= {"max_memory_bytes": placement.budget_bytes, "tracked_peak_bytes": tracker.peak_bytes,
                   "placement": placement.as_dict()}
    if args.json:
        console.print_json(result)
        return 0
    rows = [("perplexity", f"{perplexity:.4f}"), ("eval tokens", f"{windows.numel():,}"),
            ("weight bytes held", format_bytes(result["weight_bytes"])),
            ("KV cache", result["kv_cache"] or "model dtype")]
    if placement is not None:
        budget = format_bytes(placement.budget_bytes)
        rows += [("tracked peak", f"{format_bytes(tracker.peak_bytes)} (budget {budget})"),
                 ("process growth", format_bytes(result["peak_rss_bytes"] - baseline))]
    console.table(f"memfit eval: {args.model}", ("metric", "value"), rows)
    return 0
