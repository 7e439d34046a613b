"""``memfit optimize``: find the plan that fits a budget with the least loss, apply it and save it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from memfit.cli import console, options
from memfit.planner.search import EVALUATIONS
from memfit.planner.training import VERIFY, VERIFY_STEPS

EPILOG = """\
Without --budget, --max-ppl-increase PCT asks for the smallest plan within PCT percent: plans are
evaluated from the smallest predicted bytes up, skipping those predicted to lose at least as much
as one already over the limit, and the first within it wins.

The budget is bytes (60MB, 1.5GiB) or a share of the original weights (25%). It covers the
model's weights, or with --mode the whole workload's peak (weights, KV cache, activations: a
generation of --batch prompts of --seq tokens and --new-tokens more). Every candidate plan's
bytes are predicted without computing. The quality of those that fit is predicted from scores
measured once (the KL divergence from the original's outputs on 512 calibration tokens when
each attention or MLP block alone is rounded in each format, summed over the plan's blocks; other
strategies measured whole); the best --evaluate predicted, and the best with a GPTQ or AWQ format
(scored by rounding to nearest: predicted too high), are applied to a copy and evaluated
(perplexity, bytes, tokens/s), and the lowest perplexity wins (ties: faster decode). With
--objective speed, plans are evaluated from the smallest predicted weights up (decode reads every
weight byte once per token; those predicted within --max-ppl-increase first) and the fastest
decode wins; with balanced, the most tokens/s per unit of perplexity. Mixed formats
(mixed-bits-B) choose every block's format exactly for the budget from the same scores. With
--mode generate the plans also choose the KV cache's format (kv-int8, kv-int4), scored and
evaluated through the runtime's quantized cache; DIR records it for memfit generate and eval.

--distill-steps N adds "then distill" plans: what distillation wins back is not predicted, so the
best predicted plan of each kind (--distill-plans) is distilled for real from the model, N steps of
--distill-batch x --distill-seq tokens of --data (default: the built-in calibration text), forward
KL: a plan with pruned, dropped or factored layers trains every float weight before the rest of
the plan (quantization) is applied to the trained weights; a quantized plan trains rank-8 LoRA
adapters beside its frozen packed weights (their bytes count; a mixed plan is also sized to leave
room for them). The students are evaluated and
compete with the other plans; the chosen one is saved trained. Plans with pruned MLP channels or
heads, dropped layers or low-rank factors are then scored even where the same plan without them fits.

examples:
  memfit optimize --model demo --budget 30% --out memfit-out
  memfit optimize --model demo --budget 80MB --max-ppl-increase 40 --out small --json
  memfit optimize --model demo --max-ppl-increase 5 --out smallest
  memfit optimize --model demo --budget 250MB --mode generate --batch 1 --seq 2048 --out long
  memfit optimize --model demo --budget 20% --workers 2 --out small
  memfit optimize --model demo --budget 40% --objective speed --max-ppl-increase 3 --out fast
  memfit optimize --model demo --budget 20% --distill-steps 8 --out distilled
  memfit optimize --model demo --budget 1GiB --mode train --batch 8 --seq 256 --out how-to-train
  memfit optimize --model demo --budget 600MB --mode train --batch 8 --seq 256 --nproc 2 --out two

With --mode train the search is for a training step of --batch sequences of --seq tokens: what
trains (every weight, or LoRA adapters on the model or on an int8/int4/bf16 base), bf16 master
weights or autocast, checkpointing, the optimizer and the micro-batch. The plan with the highest
throughput whose predicted peak fits wins: a lower bound (weights, gradients, optimizer state) sets
plans aside, the estimator predicts the peaks of the rest fastest first, throughput is predicted
from measured micro-batches and optimizer steps, and the --verify fastest that fit run --steps real
steps of memfit train (tracked peak and tokens/s). With --nproc N the plans spread the batch over
N processes (ddp, or fsdp's shards), the budget is one rank's, and every measurement and
verification runs in N processes on this machine. DIR gets plan.yaml (memfit train --recipe
DIR/plan.yaml [--nproc N]) and report.md. JSON: {"budget_bytes", "workload", "plan", "predicted_peak_bytes",
"predicted_tokens_per_s", "measured_tokens_per_s", "measured_peak_bytes", "candidates": [...]}.

With --workers N the plans chosen for evaluation are queued as trials of an Optuna study (in
--storage: a journal file, or a database URL for workers on other machines: memfit worker) and N
local worker processes evaluate them; prediction and choice stay in this process. A study whose
search was killed resumes when the same command runs again: completed plans are not evaluated
twice, and a trial whose worker died is queued again. Tokens/s measured by workers that share a
machine are measured side by side.

JSON (last stdout line): {"budget_bytes" (null without --budget), "plan", "distill_steps" (the chosen
student's, or null), "out", "metrics": {...}, "study" ({"storage", "name"} with workers, else null),
"candidates": [{"plan", "distill_steps" (a distilled student's steps, else null), "predicted_weight_bytes",
"predicted_peak_bytes" (with --mode, else null),
"predicted_divergence" (nats per token; null for plans that do not fit and for pruned or factored
plans skipped as needless), "fits",
"metrics" (null if not evaluated), "skipped" (why a plan that fits was not evaluated: not among the
best predicted, or pruning and low-rank factors, tried only where the same plan without them does
not fit)}]}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "optimize", help="search for the best plan under a memory budget, apply it and save it",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model(parser)
    parser.add_argument("--budget", metavar="B",
                        help="the budget: 60MB, 1.5GiB or 25%% (of the weights); without it, --max-ppl-increase "
                             "asks for the smallest plan within that loss")
    parser.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                        help="reject plans whose perplexity rises more than PCT percent")
    parser.add_argument("--objective", choices=("quality", "speed", "balanced"), default="quality",
                        help="what the chosen plan is best at within the budget and --max-ppl-increase: the lowest "
                             "perplexity (default), the fastest decode, or the most tokens/s per unit of perplexity")
    parser.add_argument("--evaluate", type=options.positive_int, default=EVALUATIONS, metavar="K",
                        help=f"evaluate the K best predicted plans for real (default {EVALUATIONS}; more while none "
                             "meets --max-ppl-increase)")
    shared = parser.add_argument_group(
        "workers", "evaluate the chosen plans in worker processes that share one Optuna study (resumable: run the "
                   "same command again after a kill)")
    shared.add_argument("--workers", type=options.positive_int, metavar="N",
                        help="local worker processes (with --storage or --study alone: 1)")
    options.add_storage(shared)
    shared.add_argument("--study", metavar="NAME",
                        help="the study's name (default: from the model and the evaluation settings, so the same "
                             "search resumes and one at another budget reuses the plans both evaluate)")
    then = parser.add_argument_group(
        "then distill", "also distill the best predicted plan of each kind from the model (prune or drop, then "
                        "distill, then quantize; quantize, then distill rank-8 LoRA adapters) and weigh the students "
                        "with the other plans")
    then.add_argument("--distill-steps", type=options.positive_int, metavar="N",
                      help="distillation steps of each student (off without it); --data is the training text")
    then.add_argument("--distill-batch", type=options.positive_int, default=8, metavar="B",
                      help="sequences per distillation step (default 8)")
    then.add_argument("--distill-seq", type=options.positive_int, default=256, metavar="S",
                      help="tokens per sequence (default 256)")
    then.add_argument("--distill-plans", type=options.positive_int, default=1, metavar="K",
                      help="students distilled of each kind, the best predicted first (default 1)")
    workload = parser.add_argument_group("whole-workload budgets", "the budget covers this workload's peak")
    workload.add_argument("--mode", choices=("infer", "generate", "train"),
                          help="infer: one forward of --batch x --seq tokens; generate: a prompt of --seq tokens "
                               "into a KV cache, then --new-tokens steps; train: a training step of --batch "
                               "sequences (the fastest training plan that fits)")
    options.add_workload_sizes(workload)
    training = parser.add_argument_group("training plans (--mode train)")
    training.add_argument("--verify", type=options.positive_int, default=VERIFY, metavar="K",
                          help=f"run the K fastest predicted plans that fit for real (default {VERIFY})")
    training.add_argument("--steps", type=options.positive_int, default=VERIFY_STEPS, metavar="N",
                          help=f"steps of each verification run (default {VERIFY_STEPS}; the first is not timed)")
    training.add_argument("--data", metavar="FILE",
                          help="text the verification runs (and --distill-steps) train on (default: built-in)")
    training.add_argument("--nproc", type=options.positive_int, default=1, metavar="N",
                          help="plans over N processes (ddp, fsdp); --budget is then one rank's (default 1)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (model + report)")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write the report here (FILE.html and FILE.md); it is always in DIR")
    options.add_eval(parser)
    options.add_calibration(parser)
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from memfit.io import check_output_dir, load, save
    from memfit.planner.distill import Distillation
    from memfit.planner.report import candidate_rows, header, write_reports
    from memfit.planner.search import optimize
    from memfit.planner.workers import Workers
    from memfit.workload import Mode, Workload

    if args.mode == "train":
        return run_training(args)
    if args.nproc > 1:
        from memfit.errors import RecipeError

        raise RecipeError("--nproc spreads a training step over processes", "add --mode train, or drop --nproc")
    if args.budget is None and args.max_ppl_increase is None:
        from memfit.errors import BudgetError

        raise BudgetError("memfit optimize needs --budget, --max-ppl-increase, or both",
                          "pass --budget 30% (the best plan that fits) or --max-ppl-increase 5 (the smallest plan "
                          "within +5% perplexity)")
    if args.distill_steps is not None and args.budget is None:
        from memfit.errors import BudgetError

        raise BudgetError("--distill-steps weighs distilled students within a budget", "pass --budget with it")
    if args.objective != "quality" and args.budget is None:
        from memfit.errors import BudgetError

        raise BudgetError(f"--objective {args.objective} needs --budget",
                          "pass --budget (without it, the smallest plan within --max-ppl-increase is chosen)")
    check_output_dir(args.out)
    text = options.eval_text_of(args)
    model, tokenizer = load(args.model)
    limit = None if args.max_ppl_increase is None else args.max_ppl_increase / 100
    with console.progress_bar() as progress:
        custom = args.calibration_text is not None or args.calibration_windows != options.CALIBRATION_WINDOWS
        calibration = options.calibration_of(args, tokenizer) if custom else None  # else made if needed
        workload = None if args.mode is None else Workload(
            mode=Mode(args.mode), batch_size=args.batch, seq_len=args.seq,
            new_tokens=args.new_tokens if args.mode == "generate" else 0)
        workers = None
        if args.workers or args.storage or args.study:
            logging.getLogger("memfit.planner.workers").setLevel(logging.INFO)  # where the study is
            workers = Workers(args.model, args.workers or 1, args.storage, args.study)
        distill = None if args.distill_steps is None else Distillation(
            args.distill_steps, args.distill_batch, args.distill_seq, args.data, args.distill_plans)
        result = optimize(model, tokenizer, args.budget, max_quality_loss=limit, text=text, workload=workload,
                          num_tokens=args.tokens, calibration=calibration, evaluations=args.evaluate,
                          progress=progress, workers=workers, objective=args.objective, distill=distill)
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
            "distill_steps": best.distill_steps,
            "out": str(args.out),
            "metrics": best.metrics.to_dict(),
            "candidates": [c.to_dict() for c in result.candidates],
            "study": result.study,
        })
    else:
        goal = f"budget {args.budget}" if args.budget else f"smallest within +{args.max_ppl_increase:g}%"
        console.table(f"memfit optimize: {args.model}, {goal}", header(result), candidate_rows(result))
        console.stdout.print(f"chosen: {best.label} -> {args.out} (report: {args.out / 'report.html'})")
    return 0


TRAINING_FILES = ("plan.yaml", "report.md")  # what --mode train writes in --out (a rerun replaces them)


def run_training(args: argparse.Namespace) -> int:
    """``--mode train``: the fastest training plan that fits; writes DIR/plan.yaml and DIR/report.md."""
    from memfit.errors import BudgetError
    from memfit.io import check_output_dir, load, write_atomic
    from memfit.planner.report import TRAINING_HEADER, training_report, training_rows
    from memfit.planner.training import optimize_training
    from memfit.workload import Mode, Workload

    if args.budget is None or args.budget.endswith("%"):
        raise BudgetError("--mode train needs --budget in bytes", "pass --budget 1GiB (a share of the weights "
                          "does not bound gradients, optimizer state and activations)")
    if args.max_ppl_increase is not None or args.objective != "quality":
        raise BudgetError("--mode train chooses the fastest plan that fits; it takes no --max-ppl-increase or "
                          "--objective", "drop them")
    check_output_dir(args.out, own=TRAINING_FILES)
    model, tokenizer = load(args.model)
    workload = Workload(mode=Mode.TRAIN, batch_size=args.batch, seq_len=args.seq, ranks=args.nproc)
    with console.progress_bar() as progress:
        result = optimize_training(model, tokenizer, args.budget, workload, data=args.data, verify=args.verify,
                                   steps=args.steps, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "plan.yaml", result.best.plan.to_yaml().encode())
    write_atomic(args.out / "report.md", training_report(result, args.model).encode())
    if args.json:
        console.print_json({**result.to_json(), "out": str(args.out)})
    else:
        console.table(f"memfit optimize --mode train: {args.model}, budget {args.budget}", TRAINING_HEADER,
                      training_rows(result))
        nproc = f" --nproc {args.nproc}" if args.nproc > 1 else ""
        console.stdout.print(f"chosen: {result.best.plan.recipe} -> memfit train --model {args.model} "
                             f"--recipe {args.out / 'plan.yaml'} --batch {args.batch} --seq {args.seq}{nproc}")
    return 0
