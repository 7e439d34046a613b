"""Options shared by several subcommands, declared once."""

from __future__ import annotations

import argparse

from memfit.data import read_text
from memfit.evaluate import DEFAULT_TOKENS


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="REF",
                        help="HF directory or hub id, .gguf file, memfit output directory, 'demo', 'tiny-llama'")


def add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the built-in evaluation text)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"evaluation tokens, in windows of 512 (default {DEFAULT_TOKENS})")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def eval_text_of(args: argparse.Namespace) -> str | None:
    return None if args.text is None else read_text(args.text)
