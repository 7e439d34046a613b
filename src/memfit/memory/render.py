"""A memory report as a picture and a page: the timeline by category, and the tables.

`timeline_png` stacks each category's live bytes over the workload's allocations and frees, with
the peak marked; `render_html` wraps it with the category and module tables in one
self-contained page (the image as a data URI).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from memfit.memory.report import CATEGORIES, MemoryReport
from memfit.units import format_bytes

_COLORS = {
    "parameters": "tab:blue", "buffers": "tab:cyan", "gradients": "tab:orange", "optimizer_state": "tab:red",
    "activations": "tab:green", "kv_cache": "tab:purple", "temporary": "tab:gray",
}


def category_rows(report: MemoryReport) -> list[tuple[str, str, str]]:
    """``(category, bytes, share of the peak)`` for every category, then the total."""
    peak = report.peak_bytes or 1
    rows = [(c, format_bytes(report.by_category.get(c, 0)), f"{100 * report.by_category.get(c, 0) / peak:.1f}%")
            for c in CATEGORIES]
    return [*rows, ("peak", format_bytes(report.peak_bytes), "100.0%")]


def module_rows(report: MemoryReport, top: int = 10) -> list[tuple[str, str]]:
    """``(module, bytes it holds or allocated)`` for the ``top`` modules."""
    return [(name or "(model)", format_bytes(num_bytes)) for name, num_bytes in report.by_module[:top]]


def timeline_png(report: MemoryReport, title: str) -> bytes:
    """Live memory by category through the workload, stacked, with the peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [event for event, _ in report.timeline]
    stacks = [[live.get(c, 0) / 1e6 for _, live in report.timeline] for c in CATEGORIES]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.stackplot(events, stacks, labels=CATEGORIES, colors=[_COLORS[c] for c in CATEGORIES], step="post")
    ax.axhline(report.peak_bytes / 1e6, color="black", linestyle="--", linewidth=1,
               label=f"peak {format_bytes(report.peak_bytes)}")
    ax.set_xlabel("allocation / free event")
    ax.set_ylabel("live memory (MB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_html(report: MemoryReport, title: str, summary: Sequence[tuple[str, str]] = ()) -> str:
    """One self-contained page: ``summary`` rows, the category and module tables, the timeline."""

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    image = base64.b64encode(timeline_png(report, title)).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1>
{table(("", ""), summary)}
{table(("category", "bytes at the peak", "share"), category_rows(report))}
<p><img alt="memory by category over time" src="data:image/png;base64,{image}"></p>
{table(("module", "bytes"), module_rows(report, top=20))}
</body></html>
"""
