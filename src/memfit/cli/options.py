"""Options shared by several subcommands, declared once."""

from __future__ import annotations

import argparse

from memfit.calibration.layerwise import CALIBRATION_WINDOW, CALIBRATION_WINDOWS
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


def add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration-text", metavar="FILE",
                        help="UTF-8 text for calibrated recipes such as int4-g128-gptq "
                             "(default: the built-in calibration half, disjoint from the evaluation text)")
    parser.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS, metavar="N",
                        help=f"calibration windows of {CALIBRATION_WINDOW} tokens (default {CALIBRATION_WINDOWS})")


def calibration_of(args: argparse.Namespace, tokenizer, plan=None):
    """Calibration windows from ``--calibration-text``/``--calibration-windows``; None if ``plan``
    is given and needs none."""
    if plan is not None and not plan.needs_calibration:
        return None
    from memfit.calibration.layerwise import calibration_windows

    text = None if args.calibration_text is None else read_text(args.calibration_text)
    return calibration_windows(tokenizer, text, args.calibration_windows, CALIBRATION_WINDOW)
