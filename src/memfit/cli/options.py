"""Options shared by several subcommands, declared once."""

from __future__ import annotations

import argparse
import textwrap

from memfit.data import CALIBRATION_WINDOW, CALIBRATION_WINDOWS, read_text
from memfit.evaluate import DEFAULT_TOKENS


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="REF",
                        help="HF directory or hub id, .gguf file, memfit output directory, 'demo', 'tiny-llama'")


def add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the built-in evaluation text)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                        help=f"evaluation tokens, in windows of 512 (default {DEFAULT_TOKENS})")


def add_kv_cache(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--kv-cache", choices=("int8", "int4", "none"),
                        help=f"quantize the KV cache (kv-int8: 0.52x, kv-int4: 0.30x an fp16 cache's bytes); {what}. "
                             "Default: the format a memfit directory's plan records (memfit optimize --mode generate "
                             "may choose one), else none")


def kv_format_of(args: argparse.Namespace):
    """``--kv-cache``, or the `KVFormat` the model's saved plan records (None: the model's dtype)."""
    from memfit.io import saved_settings
    from memfit.runtime.kvcache import KVFormat

    if args.kv_cache is None:
        return saved_settings(args.model).kv_cache
    return None if args.kv_cache == "none" else KVFormat(args.kv_cache)


def add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", metavar="S",
                        help="the studies' storage: a journal file path, or a database URL such as sqlite:///memfit.db "
                             "that workers on other machines reach (default: studies.journal in memfit's cache, "
                             "$MEMFIT_CACHE or ~/.cache/memfit)")


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
    from memfit.data import calibration_windows

    text = None if args.calibration_text is None else read_text(args.calibration_text)
    return calibration_windows(tokenizer, text, args.calibration_windows, CALIBRATION_WINDOW)


def token_help(width: int = 96, column: int = 24) -> str:
    """Every registered strategy's and run setting's token forms and summary, for an epilog (from
    the registry and `memfit.settings`, so a new one shows up by itself)."""
    from memfit.settings import setting_families
    from memfit.strategies.registry import token_families

    lines = ["recipe tokens (comma-separated, or a .json/.yaml recipe file; CAPITALS are numbers or names):"]
    for forms, summary in token_families() + setting_families():
        names = ", ".join(forms.split("|"))
        body = textwrap.wrap(summary, width - column)
        if len(names) + 2 > column - 2:  # the forms get a line of their own
            lines.append(f"  {names}")
            lines += [" " * column + part for part in body]
        else:
            lines.append(f"  {names:<{column - 2}}{body[0]}")
            lines += [" " * column + part for part in body[1:]]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse ``type``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def add_workload_sizes(container) -> None:
    """``--batch``, ``--seq`` and ``--new-tokens`` of a workload, on a parser or argument group."""
    container.add_argument("--batch", type=positive_int, default=1, metavar="B", help="sequences per step (default 1)")
    container.add_argument("--seq", type=positive_int, default=512, metavar="S",
                           help="tokens per sequence, the prompt for generate (default 512)")
    container.add_argument("--new-tokens", type=positive_int, default=128, metavar="N",
                           help="tokens generated after the prompt (generate only; default 128)")
