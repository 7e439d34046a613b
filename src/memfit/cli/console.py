"""Terminal output for the CLI: progress bars on stderr, tables on stdout, the JSON last line."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memfit.evaluate import Metrics
from memfit.units import format_bytes
from memfit.workload import ProgressFn

# Tables keep their columns when stdout is a pipe or file (rich would otherwise assume 80 columns).
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """A ``progress(description, done, total)`` callback drawing one bar per description on stderr."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=False, disable=not stderr.is_terminal,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=done, total=total)

        yield update


def print_json(data: dict) -> None:
    """Print ``data`` as the last line of stdout."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        t.add_row(*row)
    stdout.print(t)


def metrics_rows(metrics: Metrics) -> list[tuple[str, str]]:
    rate = lambda v: "-" if v is None else f"{v:.1f}"
    return [
        ("perplexity", f"{metrics.perplexity:.4f}"),
        ("eval tokens", str(metrics.eval_tokens)),
        ("weight memory", format_bytes(metrics.weight_bytes)),
        ("peak RSS", format_bytes(metrics.peak_rss_bytes)),
        ("prefill tokens/s", rate(metrics.prefill_tokens_per_s)),
        ("decode tokens/s", rate(metrics.decode_tokens_per_s)),
    ]
