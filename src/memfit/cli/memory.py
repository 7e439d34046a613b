"""``memfit profile`` and ``memfit estimate``: measured and predicted memory of a workload.

Both take the same options. ``profile`` loads the model, applies the recipe and runs the workload
with every allocation tracked; ``estimate`` reads only the config and runs the same code on fake
tensors, so it answers for models far larger than the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

from memfit.cli import console, options

_WORKLOADS = """\
workloads (--mode):
  infer     one forward of --batch sequences of --seq tokens, no KV cache, no gradients
  generate  a prompt of --seq tokens into a KV cache sized for prompt + --new-tokens, then
            --new-tokens single-token steps (batch --batch)
  train     two steps of forward, backward and optimizer step; the peak is the steady state,
            with the optimizer state allocated
  distill   (estimate) two steps of memfit distill: train's, with the teacher (or its cache) and
            the chunked distillation loss

categories: parameters, buffers, gradients, optimizer_state, activations (allocated in a
module's forward), kv_cache, temporary (backward and optimizer arithmetic, work between modules)"""

_RECIPES = """\
recipe tokens: int8, int4-gN, bf16, fp16 and the rest of memfit compress's (weights);
training: bf16-autocast, bf16-master, checkpointing, checkpointing-K (every K-th layer),
adamw, adamw-8bit, adafactor, sgd, lora-R, grad-accum-N, ddp, fsdp (estimate --nproc N:
one rank's share); comma-separated; see memfit train --help"""

PROFILE_EPILOG = f"""\
{_WORKLOADS}

{_RECIPES}

examples:
  memfit profile --model demo --mode train --batch 2 --seq 256
  memfit profile --model demo --mode generate --batch 4 --seq 256 --new-tokens 256 --json
  memfit profile --model ./smollm2-int8 --mode infer --seq 1024 --report profile.html

JSON (last stdout line): {{"peak_bytes", "by_category": {{...}}, "by_module": [[name, bytes], ...top 20],
"peak_rss_bytes", "rss_growth_bytes", "tracked_growth_bytes"}}"""

ESTIMATE_EPILOG = f"""\
models (--model): anything --model accepts elsewhere, a config.json, or a bundled config:
  {{configs}}
Bundled configs and bare config files are fp32; add bf16 to the recipe for bf16 weights.

{_WORKLOADS}

{_RECIPES}

examples:
  memfit estimate --model llama-3-70b --mode train --batch 1 --seq 4096 --json
  memfit estimate --model llama-3-8b --mode generate --batch 8 --seq 2048 --new-tokens 512 --recipe int4-g128
  memfit estimate --model demo --mode train --seq 256 --recipe bf16,sgd --budget 1GiB
  memfit estimate --model llama-3-8b --mode train --batch 8 --seq 2048 --recipe fsdp,bf16-master --nproc 8
  memfit estimate --model demo --mode generate --seq 32 --new-tokens 32 --max-memory 25%
  memfit estimate --model demo --mode distill --student drop-layers-6 --batch 8 --seq 256 [--top-k 64]
  memfit estimate --model llama-3-70b --recipe int4-g128 --mode generate --seq 512 --new-tokens 512 \
      --max-memory 24GB --memory-bandwidth 1TB --read-bandwidth 25GB --host-memory 64GB

JSON (last stdout line): {{"peak_bytes", "by_category": {{...}}, "by_module": [[name, bytes], ...top 20]}},
plus "max_batch_size" with --budget; with --max-memory: {{"placement", "weight_bytes", "prediction":
{{"resident_bytes", "streamed_bytes", "tokens_per_s", "tokens_per_s_read_when_reached",
"tokens_per_s_read_ahead", "rates"}}}} (prediction null for a model without weights here and no bandwidths)"""


def add_parser(subparsers) -> None:
    from memfit.models.refs import bundled_configs

    for name, run, epilog, summary in (
        ("profile", run_profile, PROFILE_EPILOG, "measure the memory of a workload, by category and module"),
        ("estimate", run_estimate, ESTIMATE_EPILOG.replace("{configs}", ", ".join(bundled_configs())),
         "predict the memory of a workload without running it (any model size)"),
    ):
        parser = subparsers.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + ".", epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        options.add_model(parser)
        modes = ("infer", "generate", "train", "distill") if name == "estimate" else ("infer", "generate", "train")
        parser.add_argument("--mode", choices=modes, default="infer", help="the workload (default infer)")
        options.add_workload_sizes(parser)
        parser.add_argument("--recipe", default="none", metavar="R",
                            help="strategies to apply first, e.g. int8 or bf16,checkpointing (default none)")
        parser.add_argument("--optimizer", choices=("adamw", "adamw-8bit", "adafactor", "sgd"), default=None,
                            help="optimizer for train (default adamw; same as adding the token to --recipe)")
        if name == "estimate":
            parser.add_argument("--nproc", type=options.positive_int, default=1, metavar="N",
                                help="train only: processes the batch is split over (with ddp or fsdp in "
                                     "the recipe); the report is one rank's")
            parser.add_argument("--budget", metavar="SIZE",
                                help="also print the largest batch whose predicted peak fits SIZE (e.g. 1GiB)")
            distill = parser.add_argument_group(
                "distillation (--mode distill)",
                "a step of memfit distill: --model is the teacher, --recipe the training tokens; the teacher's "
                "weights and forward, the student's step and the chunked loss (with --top-k: a teacher cache's "
                "reads instead of the teacher)")
            distill.add_argument("--student", default="none", metavar="SPEC",
                                 help="a recipe applied to the teacher (drop-layers-6), or a model (default none)")
            distill.add_argument("--top-k", type=options.positive_int, metavar="K",
                                 help="the teacher comes from a cache of its top K log-probabilities")
            speed = parser.add_argument_group(
                "models larger than memory (--mode generate)",
                "with --max-memory, predict the placement memfit generate --max-memory would choose (what stays "
                "resident, what is streamed per token) and its decode tokens/s: measured on this machine for a "
                "model whose weights are here, or from the two bandwidths given")
            speed.add_argument("--max-memory", metavar="B",
                               help="the memory the run may hold (e.g. 150MB, or 25%% of the model's weight bytes)")
            speed.add_argument("--memory-bandwidth", metavar="RATE",
                               help="assume the device reads its memory at RATE bytes/s (e.g. 1TB for a GPU's)")
            speed.add_argument("--read-bandwidth", metavar="RATE",
                               help="assume streamed bytes arrive at RATE bytes/s, overlapped with compute "
                                    "(e.g. 25GB for pinned host memory over PCIe 4.0 x16)")
            speed.add_argument("--host-memory", metavar="B",
                               help="with the bandwidths: the host memory the streamed bytes are held in (checked)")
        parser.add_argument("--report", type=Path, metavar="FILE",
                            help="write the tables and a timeline plot by category (.html page or .png plot)")
        options.add_json(parser)
        parser.set_defaults(run=run)


def _plan_and_workload(args: argparse.Namespace):
    from memfit.errors import OutputError
    from memfit.plan import Plan
    from memfit.workload import Mode, Workload

    recipe = args.recipe if args.optimizer is None else f"{args.recipe},{args.optimizer}"
    if args.mode == "distill":  # the student's recipe and the training's
        from memfit.train.distill import split_student

        args.student_ref, recipe = split_student(args.student, str(args.model), recipe)
    plan = Plan.parse(recipe)  # bad recipes fail before anything is loaded
    mode = Mode.TRAIN if args.mode == "distill" else Mode(args.mode)
    new_tokens = args.new_tokens if mode is Mode.GENERATE else 0
    workload = Workload(mode=mode, batch_size=args.batch, seq_len=args.seq, new_tokens=new_tokens,
                        ranks=getattr(args, "nproc", 1) if mode is Mode.TRAIN else 1)
    if args.report is not None:
        if args.report.suffix not in (".html", ".png"):
            raise OutputError(f"report {str(args.report)!r} is neither .html nor .png", "name it report.html or .png")
        if not args.report.parent.is_dir():
            raise OutputError(f"the directory of report {str(args.report)!r} does not exist", "create it first")
    return plan, workload


def _label(args: argparse.Namespace, plan, workload) -> str:
    sizes = f"batch {workload.batch_size}, seq {workload.seq_len}"
    if workload.new_tokens:
        sizes += f" + {workload.new_tokens} new"
    if args.mode == "distill":
        teacher = f"from a teacher cache of top {args.top_k}" if args.top_k else "teacher in memory"
        return f"{args.model} -> {args.student}: distill {teacher}, {sizes}, recipe {plan.recipe}"
    return f"{args.model}: {workload.mode.value}, {sizes}, recipe {plan.recipe}"


@contextlib.contextmanager
def _status(text: str):
    if console.stderr.is_terminal:
        with console.stderr.status(text):
            yield
    else:
        yield


def run_estimate(args: argparse.Namespace) -> int:
    from memfit.estimate import estimate, max_batch_size
    from memfit.io import skeleton
    from memfit.units import format_bytes, parse_bytes

    plan, workload = _plan_and_workload(args)
    if args.max_memory is not None:
        return _estimate_streamed(args, plan, workload)
    budget_bytes = parse_bytes(args.budget) if args.budget is not None else None
    objective = None
    if args.mode == "distill":
        from memfit.train.distill import DistillConfig, fake_objective

        objective = fake_objective(args.model, DistillConfig(), args.top_k, workload.seq_len)
    with _status("reading the config"):
        model = skeleton(getattr(args, "student_ref", args.model))
    with _status("running the workload on fake tensors"):
        report = estimate(model, plan, workload, objective=objective)
    batch = None
    if budget_bytes is not None:
        with _status(f"searching the largest batch under {format_bytes(budget_bytes)}"):
            batch = max_batch_size(model, budget_bytes, workload, plan, objective=objective)
    extra = {} if batch is None else {"max_batch_size": batch}
    summary = [] if batch is None else [(f"largest batch under {format_bytes(budget_bytes)}", str(batch))]
    _output(args, "memfit estimate", _label(args, plan, workload), report, extra, summary)
    return 0


def _estimate_streamed(args: argparse.Namespace, plan, workload) -> int:
    """``estimate --max-memory``: the placement and its predicted decode speed."""
    from memfit.errors import RecipeError
    from memfit.estimate import placement_inputs
    from memfit.offload import plan_placement
    from memfit.speed import Rates, measure, predict
    from memfit.units import format_bytes, parse_budget, parse_bytes
    from memfit.workload import Mode

    if workload.mode is not Mode.GENERATE:
        raise RecipeError("--max-memory predicts generation", "add --mode generate")
    assumed = (args.memory_bandwidth, args.read_bandwidth)
    if (assumed[0] is None) != (assumed[1] is None):
        raise RecipeError("--memory-bandwidth and --read-bandwidth go together", "pass both, or neither to measure")
    bandwidths = [parse_bytes(rate) for rate in assumed] if assumed[0] is not None else None  # bad ones fail first
    host_memory = parse_bytes(args.host_memory) if args.host_memory is not None else None
    with _status("reading the model"):
        model, stored, on_disk = placement_inputs(args.model, plan)
    weights = sum(t.nbytes for t in stored.values())
    budget = parse_budget(args.max_memory, weights)
    with _status("placing the layers (the workload on fake tensors)"):
        placement = plan_placement(model, stored, budget, batch=workload.batch_size, prompt_tokens=workload.seq_len,
                                   new_tokens=workload.new_tokens, kv_format=plan.run.kv_cache)
    if bandwidths is not None:
        if host_memory is not None and placement.streamed_bytes > host_memory:
            raise RecipeError(f"the streamed layers hold {format_bytes(placement.streamed_bytes)}, over --host-memory "
                              f"{args.host_memory}", "raise --max-memory or compress the model further")
        rates = Rates.assumed(weights, *bandwidths, batch=workload.batch_size,
                              context=workload.seq_len + workload.new_tokens)
    elif on_disk:
        placement.read_ahead = False  # what generate does when the file is in the page cache, as measuring leaves it
        with _status("measuring this machine: the runtime's step with every layer streamed, and reads"):
            rates = measure(args.model, batch=workload.batch_size, prompt_tokens=workload.seq_len,
                            new_tokens=workload.new_tokens)
    else:
        rates = None
    prediction = predict(placement, rates) if rates is not None else None
    if args.json:
        console.print_json({"placement": placement.as_dict(), "weight_bytes": weights,
                            "prediction": prediction.as_dict() if prediction else None})
        return 0
    console.stdout.print(f"memfit estimate: {_label(args, plan, workload)}, --max-memory {format_bytes(budget)}")
    console.stdout.print(f"placement: {placement.describe()}", soft_wrap=True)
    console.stdout.print(f"predicted peak: {format_bytes(placement.predicted_peak_bytes)} "
                         f"(resident {format_bytes(placement.resident_bytes)}, buffer "
                         f"{format_bytes(placement.ring_bytes)}, workspace {format_bytes(placement.workspace_bytes)})")
    if prediction is None:
        console.stdout.print("speed: the weights are not on this machine; pass --memory-bandwidth and "
                             "--read-bandwidth to predict it", soft_wrap=True)
        return 0
    source = ("assumed bandwidths" if rates.source == "assumed" else
              f"measured here: step compute {rates.compute_s * 1e3:.1f} ms, reads "
              f"{format_bytes(int(rates.read_bytes_per_s))}/s with {rates.read_threads} threads, "
              f"{format_bytes(int(rates.read_one_bytes_per_s))}/s with one")
    console.stdout.print(f"predicted decode: {prediction.tokens_per_s:.1f} tokens/s at batch {workload.batch_size} "
                         f"(read when reached {prediction.tokens_per_s_read_when_reached:.1f}, read ahead "
                         f"{prediction.tokens_per_s_read_ahead:.1f}; {source})", soft_wrap=True)
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from memfit.io import load
    from memfit.memory.report import weight_bytes
    from memfit.memory.rss import RssWatch, make_resident, return_freed_memory
    from memfit.plan import apply
    from memfit.profile import profile
    from memfit.units import format_bytes
    from memfit.workload import Context

    plan, workload = _plan_and_workload(args)
    return_freed_memory()  # so RSS follows live tensors, not the allocator's history
    model, _ = load(args.model)
    with console.progress_bar() as progress:
        apply(model, plan, Context(progress=progress))
    start_bytes = weight_bytes(model)
    make_resident(model)  # mmap-backed weights would otherwise page in during the run
    # one-time work (lazy imports and kernel set-up on the first forward) stays out of the run
    warm_up = dataclasses.replace(workload, batch_size=1, new_tokens=min(workload.new_tokens, 1))
    profile(model, warm_up, dataclasses.replace(plan.run, micro_batches=None))
    with _status("running the workload"), RssWatch() as watch:
        report = profile(model, workload, plan.run)
    tracked_growth = report.peak_bytes - start_bytes
    extra = {
        "peak_rss_bytes": watch.peak_bytes,
        "rss_growth_bytes": watch.growth_bytes,
        "tracked_growth_bytes": tracked_growth,
    }
    explained = f"{100 * tracked_growth / watch.growth_bytes:.1f}%" if watch.growth_bytes else "-"
    summary = [
        ("process peak RSS", format_bytes(watch.peak_bytes)),
        ("RSS growth during the run", format_bytes(watch.growth_bytes)),
        ("tracked growth (peak - weights)", f"{format_bytes(tracked_growth)} ({explained} of the RSS growth)"),
    ]
    _output(args, "memfit profile", _label(args, plan, workload), report, extra, summary)
    return 0


def _output(args, command: str, label: str, report, extra: dict, summary: list[tuple[str, str]]) -> None:
    from memfit.io import write_atomic
    from memfit.memory.render import category_rows, module_rows, render_html, timeline_png

    title = f"{command}: {label}"
    if args.report is not None:
        data = render_html(report, title, summary).encode() if args.report.suffix == ".html" else timeline_png(
            report, title)
        write_atomic(args.report, data)
    if args.json:
        console.print_json({**report.to_dict(top=20), **extra})
        return
    console.table(title, ("category", "bytes at the peak", "share"), category_rows(report))
    console.table("top modules (bytes held and allocated)", ("module", "bytes"), module_rows(report, top=10))
    for key, value in summary:
        console.stdout.print(f"{key}: {value}")
    if args.report is not None:
        console.stdout.print(f"report: {args.report}")
