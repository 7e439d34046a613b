"""``memfit generate``: stream text from a model through memfit's runtime."""

from __future__ import annotations

import argparse
import contextlib
import sys

from memfit.cli import console, options

EPILOG = """\
examples:
  memfit generate --model demo --chat --prompt "Name three uses of a paperclip."
  memfit generate --model ./smollm2-int4 --prompt-file prompt.txt --max-new-tokens 200 --json
  memfit generate --model demo --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 7
  memfit generate --model demo --prompt "Once upon a time" --max-memory 25%    # streams what does not fit
  memfit generate --model ./smollm2-int4 --prompt-file prompts.txt --batch 16 --max-memory 60MB --json
  memfit generate --model demo --prompt-file long.txt --kv-cache int4 --max-memory 40%

Decode steps run in memfit's C library, one call per token (decode_step "native"), for models in
float32, bf16, int8, int4-gN, w8a8 and structurally pruned shapes; nothing is compiled but the
library, once per machine. Other formats (LoRA, low-rank, sparse, fp8) run the step compiled with
torch.compile on first use of a model and shape (inductor caches it on disk, so a second run skips
most of that), or eagerly with --no-compile. --no-native runs the PyTorch step for every model.

JSON (last stdout line, after the streamed text): {"text", "prompt_tokens", "new_tokens", "ttft_s",
"decode_tokens_per_s", "weight_bytes", "kv_cache_bytes", "tokenizer_rss_bytes", "baseline_rss_bytes",
"peak_rss_bytes", "decode_step", "compiled", "compile_s", "stopped"} (of the first prompt); with
--batch also "texts", "batch", "prompts" and "batch_decode_tokens_per_s" (the first batch's new
tokens after each row's first, per second of decoding, all rows together). compile_s: seconds this run
spent compiling (memfit's C library on its first use on a machine, a few seconds; the
torch.compile'd step on a model and shape's first run). baseline_rss_bytes is the
process just before the model's weights are read: memfit, torch and transformers imported and the
tokenizer loaded (tokenizer_rss_bytes is what loading the tokenizer added); peak_rss_bytes minus it
is what the model and its generation held.

--max-memory B runs a model larger than B: the embedding, head, norms and the decoder layers that
fit stay in memory; the rest are read from the model's safetensors file at every token, through a
small buffer: ahead, by a background thread, while the current layers compute (--prefetch), or
when reached, by all the decode step's threads (--no-prefetch); by default the second when the
file is in the page cache (reads are then copies a core makes), else the first. The budget counts
the weights held, the buffer, the KV cache, the activations and workspace, and the model's
modules; what was placed where is printed. JSON adds "max_memory_bytes", "tracked_peak_bytes" (the
run's tracked peak, within the budget), "bytes_read_per_token" and "placement" ({"resident_layers",
"streamed_layers", "resident_bytes", "streamed_bytes", "ring_bytes", "workspace_bytes",
"predicted_peak_bytes", "budget_bytes", "files", "read_ahead", "cached_fraction", "context_tokens",
"batch", "kv_cache"}); context_tokens is the longest prompt plus new tokens per row the budget holds with
that placement and KV cache (predicted), which is also printed. Streaming reads memfit directories,
Hugging Face directories with one safetensors file, and demo. --no-page-cache reads every token's
streamed layers from the disk, leaving nothing of them in the page cache.

--kv-cache int8|int4 keeps the KV cache quantized (per token in 8 bits; in 4 bits keys per channel over
32-token groups and values per token): 0.52x / 0.30x an fp16 cache's bytes at 2,048 tokens, perplexity
+0.03% / +2.4% on the demo model; with --max-memory the budget then holds a longer context. A memfit
directory whose plan records a format (memfit optimize --mode generate chose it) decodes with it unless
--kv-cache says otherwise (none: the model's dtype)."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="stream text from a model (static KV cache, native or compiled decode step)",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 for greedy (default); above 0 samples")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K most likely (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="penalize tokens already seen (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--no-compile", action="store_true",
                        help="where the PyTorch step decodes, run it eagerly (no torch.compile)")
    parser.add_argument("--no-native", action="store_true",
                        help="decode with the PyTorch step even where memfit's C step runs the model")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="decode N prompts together (throughput mode): each non-empty line of --prompt-file "
                             "is a prompt, taken N at a time; texts are printed when a batch ends")
    parser.add_argument("--max-memory", metavar="B",
                        help="run within B bytes (e.g. 150MB, or 25%% of the model's weight bytes): the decoder "
                             "layers that do not fit are streamed from the model's file, the next ones read ahead "
                             "while the current ones compute")
    options.add_kv_cache(parser, "decodes with the compiled PyTorch step (eagerly with --max-memory)")
    reads = parser.add_mutually_exclusive_group()
    reads.add_argument("--prefetch", action="store_true",
                       help="with --max-memory, always read streamed layers ahead in a background thread")
    reads.add_argument("--no-prefetch", action="store_true",
                       help="with --max-memory, read each streamed layer only when it is reached, with the "
                            "step's threads (default: this when the file is in the page cache, else read-ahead)")
    parser.add_argument("--no-page-cache", action="store_true",
                        help="with --max-memory, read streamed layers around the page cache (O_DIRECT where the "
                             "file system allows, else dropping each read's pages): every token reads the disk, as "
                             "for a model larger than the machine's memory, and other files keep their place in "
                             "the cache (reads are then ahead by default)")
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit import native
    from memfit.data import read_text
    from memfit.errors import RecipeError
    from memfit.io import import_model_code, load, load_tokenizer
    from memfit.memory import track
    from memfit.memory.report import weight_bytes
    from memfit.memory.rss import lifetime_peak_rss_bytes, rss_bytes
    from memfit.runtime import Engine, Sampling, stream
    from memfit.runtime.engine import CACHE_STEP
    from memfit.runtime.generate import encode, generate_batch
    from memfit.units import format_bytes

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    prompt = args.prompt if args.prompt is not None else read_text(args.prompt_file)
    prompts = [prompt]
    if args.batch is not None:
        if args.batch < 1:
            raise RecipeError(f"--batch must be at least 1 (got {args.batch})", "pass a positive batch size")
        prompts = [line for line in prompt.splitlines() if line.strip()] if args.prompt is None else [prompt]
        if not prompts:
            raise RecipeError(f"{args.prompt_file!r} has no non-empty line", "write one prompt per line")
    before_tokenizer = rss_bytes()
    tokenizer = load_tokenizer(args.model)  # text in and out: loaded before the model's baseline
    if args.max_memory is not None:
        import_model_code(args.model)  # code, not the model: before the baseline the budget is checked from
    baseline = rss_bytes()
    streamed = placement = tracker = None
    batch = min(args.batch or 1, len(prompts))
    longest = max(len(encode(tokenizer, p, args.chat)) for p in prompts)
    kv_format = options.kv_format_of(args)
    if args.max_memory is not None:
        model, streamed, placement = _load_within(args, batch, longest, kv_format)
        if not args.json:
            console.stderr.print(f"placement: {placement.describe()}", soft_wrap=True)
    else:
        model, _ = load(args.model, tokenizer=False)
    engine = Engine(model, compile=not args.no_compile, native=not args.no_native, streamed=streamed,
                    cache_step=1 if placement is not None else CACHE_STEP, kv_format=kv_format)
    result = []
    with contextlib.ExitStack() as stack:
        if placement is not None:  # the budget is checked against what the run holds, tracked
            tracker = stack.enter_context(track(model))
            tracker.hold(engine.cache_for(batch, longest + args.max_new_tokens).tensors())
        if args.batch is None:
            for piece in stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                stop=args.stop, chat=args.chat, engine=engine, result=result):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            rates = []
            for first in range(0, len(prompts), batch):
                done_batch, rate = generate_batch(model, tokenizer, prompts[first:first + batch],
                                                  max_new_tokens=args.max_new_tokens, sampling=sampling,
                                                  stop=args.stop, chat=args.chat, engine=engine)
                for row in done_batch:
                    sys.stdout.write(row.text + "\n")
                sys.stdout.flush()
                result.extend(done_batch)
                rates.append(rate)
    done = result[0]
    extra = {}
    if placement is not None:
        extra = {"max_memory_bytes": placement.budget_bytes, "tracked_peak_bytes": tracker.peak_bytes,
                 "bytes_read_per_token": placement.streamed_bytes, "placement": placement.as_dict()}
    compile_s = native.build_seconds() + engine.compile_seconds
    if args.batch is not None:  # the batch's rate, and every prompt's text
        extra = {"texts": [r.text for r in result], "batch": batch, "prompts": len(result),
                 "batch_decode_tokens_per_s": rates[0], **extra}
    if args.json:
        console.print_json({
            "text": done.text, "prompt_tokens": done.prompt_tokens, "new_tokens": done.new_tokens,
            "ttft_s": done.ttft_s, "decode_tokens_per_s": done.decode_tokens_per_s,
            "weight_bytes": weight_bytes(model), "kv_cache_bytes": done.kv_cache_bytes,
            "tokenizer_rss_bytes": baseline - before_tokenizer, "baseline_rss_bytes": baseline,
            "peak_rss_bytes": lifetime_peak_rss_bytes(),
            "decode_step": done.decode_step, "compiled": done.compiled, "compile_s": compile_s,
            "stopped": done.stopped, **extra,
        })
    else:
        rate = f"{done.decode_tokens_per_s:.1f} tokens/s ({done.decode_step} step)"
        if compile_s:
            rate += f"; compiling took {compile_s:.1f} s (once per machine and model shape)"
        console.stderr.print(f"{done.prompt_tokens} prompt tokens, {done.new_tokens} new; first token after "
                             f"{done.ttft_s:.2f} s, then {rate}", soft_wrap=True)
        if placement is not None:
            grown = lifetime_peak_rss_bytes() - baseline
            console.stderr.print(f"memory: tracked peak {format_bytes(tracker.peak_bytes)}, process grew by "
                                 f"{format_bytes(grown)}, budget {format_bytes(placement.budget_bytes)}",
                                 soft_wrap=True)
    return 0


def _load_within(args: argparse.Namespace, batch: int, longest: int, kv_format):
    """``(model, streamed weights, placement)`` for ``--max-memory``: ``batch`` rows of up to
    ``longest`` prompt tokens."""
    from memfit.io import stored_tensors
    from memfit.offload import READ_AHEAD, load_streamed
    from memfit.units import parse_budget

    stored = stored_tensors(args.model)
    budget = parse_budget(args.max_memory, sum(t.nbytes for t in stored.values()))
    return load_streamed(args.model, budget, batch=batch, prompt_tokens=longest,
                         new_tokens=max(args.max_new_tokens, 1),
                         ahead=0 if args.no_prefetch else READ_AHEAD if args.prefetch else None, kv_format=kv_format,
                         page_cache=not args.no_page_cache)
