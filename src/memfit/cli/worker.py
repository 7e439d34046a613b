"""``memfit worker``: evaluate the queued plans of a search's study, one at a time, until none is left."""

from __future__ import annotations

import argparse

from memfit.cli import console, options

EPILOG = """\
`memfit optimize --workers N` starts its own workers on this machine. Workers on other machines
join the same search by naming its study and storage (a database URL that every machine reaches,
or a journal file on a shared file system); the model reference must load the same model there.
A worker takes one queued trial at a time; if it dies, its trial is queued again (by the search,
or by the next worker that looks), so nothing is lost and no plan is completed twice.

examples:
  memfit worker --study memfit-optimize-3f2a9c1e0b7d4a55
  memfit worker --storage postgresql://user@db/memfit --study big-search --threads 16

JSON (last stdout line): {"study", "storage", "completed" (trials this worker completed)}"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "worker", help="evaluate queued plans of a memfit optimize search (--workers) from this process",
        description=__doc__.split("``: ")[1], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", required=True, metavar="NAME", help="the study's name (memfit optimize prints it)")
    options.add_storage(parser)
    parser.add_argument("--threads", type=options.positive_int, metavar="T",
                        help="torch threads for this worker (default: torch's own)")
    options.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from memfit.planner.trials import SharedTrials, default_storage
    from memfit.planner.workers import work

    if args.threads:
        torch.set_num_threads(args.threads)
    storage = args.storage or default_storage()
    shared = SharedTrials(storage, args.study)
    with console.progress_bar() as progress:
        completed = work(shared, progress)
    if args.json:
        console.print_json({"study": args.study, "storage": storage, "completed": completed})
    else:
        console.stdout.print(f"memfit worker: completed {completed} trial(s) of study {args.study}")
    return 0
