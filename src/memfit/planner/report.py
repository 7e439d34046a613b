"""The planner's report: every candidate in a table and a plot of perplexity against memory.

`render_markdown` and `render_html` carry the same content; the HTML embeds its plot as a PNG data
URI, so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io

from memfit.planner.search import Candidate, OptimizeResult
from memfit.units import format_bytes

HEADER = ("plan", "predicted weights", "measured weights", "fits", "predicted KL", "perplexity", "change",
          "decode tok/s")
PEAK = "predicted peak"  # after "predicted weights", with a workload budget


def header(result: OptimizeResult) -> tuple[str, ...]:
    """The columns of `candidate_rows`."""
    return HEADER[:2] + (PEAK,) + HEADER[2:] if result.workload else HEADER


def candidate_rows(result: OptimizeResult) -> list[tuple[str, ...]]:
    """One row of strings per candidate, in `header` order; the chosen plan is marked with ``*``."""
    rows = []
    base = result.baseline.perplexity
    for c in result.candidates:
        m = c.metrics
        mark = " *" if c is result.best else ""
        peak = (format_bytes(c.predicted_peak_bytes) if c.predicted_peak_bytes is not None else "-",)
        rows.append(
            (
                c.label + mark,
                format_bytes(c.predicted_weight_bytes),
                *(peak if result.workload else ()),
                format_bytes(m.weight_bytes) if m else "-",
                "yes" if c.fits else "no",
                f"{c.predicted_divergence:.2e}" if c.predicted_divergence is not None else "-",
                f"{m.perplexity:.3f}" if m else ("skipped" if c.skipped else "-"),
                f"{100 * (m.perplexity / base - 1):+.2f}%" if m else "-",
                f"{m.decode_tokens_per_s:.1f}" if m and m.decode_tokens_per_s else "-",
            )
        )
    return rows


def _summary(result: OptimizeResult) -> list[str]:
    best = result.best
    work = result.workload
    covers = ("of weights" if work is None else
              f"for {work.mode.value} at batch {work.batch_size}, {work.seq_len} tokens"
              + (f" + {work.new_tokens} new" if work.new_tokens else "") + " (weights, KV cache, activations)")
    budget = (f"Budget: {format_bytes(result.budget_bytes)} {covers}." if result.budget_bytes is not None else
              f"No budget: the smallest plan within +{100 * result.max_quality_loss:g}% perplexity.")
    lines = [
        f"{budget} "
        f"Original: {format_bytes(result.baseline.weight_bytes)}, perplexity {result.baseline.perplexity:.3f}.",
        f"Chosen: `{best.label}`, {format_bytes(best.metrics.weight_bytes)} measured, "
        f"perplexity {best.metrics.perplexity:.3f} "
        f"({100 * (best.metrics.perplexity / result.baseline.perplexity - 1):+.2f}%).",
        f"Evaluated on {best.metrics.eval_tokens} tokens. Candidates over budget were predicted, not evaluated.",
    ]
    structural = [c for c in result.candidates if c.skipped and " fits without " in c.skipped]
    if structural:
        lines.append(
            f"{len(structural)} plans with pruning or low-rank factors were skipped: the same plan without them "
            "fits, and they only add loss."
        )
    ranked = [c for c in result.candidates if c.predicted_divergence is not None]
    evaluated = [c for c in ranked if c.metrics is not None]
    if result.budget_bytes is None:
        lines.append(
            f"{len(evaluated)} of the {len(ranked)} plans were evaluated, from the smallest up; a plan predicted to "
            "lose at least as much as one already over the limit was skipped."
        )
    else:
        order = {
            "quality": "the best by predicted KL divergence from the original (per-block scores measured once on 512 "
                       "calibration tokens, summed)",
            "speed": "the smallest by predicted weight bytes (those predicted within the quality limit first)",
            "balanced": "the best by predicted weight bytes x exp(predicted KL divergence)",
        }[result.objective.value]
        lines.append(f"{len(evaluated)} of the {len(ranked)} plans that fit were evaluated: {order}.")
        if result.objective.value != "quality":
            lines.append("Objective: " + ("the fastest decode." if result.objective.value == "speed" else
                                          "the most decode tokens/s per unit of perplexity."))
    if result.max_quality_loss is not None:
        lines.append(f"Quality limit: perplexity at most +{100 * result.max_quality_loss:g}%.")
    notes = sorted({n for c in result.candidates for n in c.notes})
    lines += [f"Note: {n}." for n in notes]
    return lines


def plot_png(result: OptimizeResult) -> bytes:
    """Perplexity against measured weight bytes, with the budget line and the chosen plan marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated: list[Candidate] = [c for c in result.candidates if c.metrics is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for c in evaluated:
        x, y = c.metrics.weight_bytes / 1e6, c.metrics.perplexity
        ax.scatter([x], [y], color="tab:blue" if c.fits else "tab:gray", zorder=3)
    for (x, y), recipes in _label_clusters(evaluated):
        ax.annotate("\n".join(recipes), (x, y), textcoords="offset points", xytext=(6, 0), fontsize=8, va="center")
    ax.axhline(result.baseline.perplexity, color="tab:gray", linestyle=":", label="original perplexity")
    best = result.best.metrics
    ax.scatter([best.weight_bytes / 1e6], [best.perplexity], marker="*", s=260, color="tab:red", zorder=4,
               label=f"chosen: {result.best.plan.recipe}")
    if result.budget_bytes is not None:
        ax.axvline(result.budget_bytes / 1e6, color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("weight memory (MB, measured)")
    ax.set_ylabel("perplexity")
    ax.set_title("memfit optimize: candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _label_clusters(candidates: list[Candidate]) -> list[tuple[tuple[float, float], list[str]]]:
    """Group candidates whose points nearly coincide (within 2% of bytes and 1% of perplexity), so
    their labels are stacked once instead of printed over each other."""
    clusters: list[tuple[tuple[float, float], list[str]]] = []
    for c in sorted(candidates, key=lambda c: (c.metrics.weight_bytes, c.metrics.perplexity)):
        x, y = c.metrics.weight_bytes / 1e6, c.metrics.perplexity
        if clusters:
            (cx, cy), recipes = clusters[-1]
            if abs(x - cx) <= 0.02 * cx and abs(y - cy) <= 0.01 * cy:
                recipes.append(c.label)
                continue
        clusters.append(((x, y), [c.label]))
    return clusters


def render_markdown(result: OptimizeResult, png: bytes | None = None) -> str:
    """The report as Markdown (the plot embedded as a data URI when ``png`` is given)."""
    lines = ["# memfit optimize report", "", *_summary(result), ""]
    lines.append("| " + " | ".join(header(result)) + " |")
    lines.append("|" + "---|" * len(header(result)))
    lines += ["| " + " | ".join(row) + " |" for row in candidate_rows(result)]
    if png is not None:
        lines += ["", f"![perplexity against memory](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines) + "\n"


def render_html(result: OptimizeResult, png: bytes) -> str:
    """The report as one self-contained HTML page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header(result))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in candidate_rows(result)
    )
    summary = "".join(f"<p>{html.escape(line).replace('`', '')}</p>" for line in _summary(result))
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>memfit optimize report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body><h1>memfit optimize report</h1>{summary}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><img alt="perplexity against memory" src="data:image/png;base64,{image}"></p>
</body></html>
"""


def write_reports(result: OptimizeResult) -> dict[str, str]:
    """``{"report.html": ..., "report.md": ...}`` for `memfit.save`'s ``extra_files``."""
    png = plot_png(result)
    return {"report.html": render_html(result, png), "report.md": render_markdown(result, png)}


# -- training plans (`memfit.planner.training`) ------------------------------------------------------------
TRAINING_HEADER = ("plan", "lower bound", "predicted peak", "fits", "predicted tok/s", "measured tok/s",
                   "measured peak")


def training_rows(result) -> list[tuple[str, ...]]:
    """One row per training plan whose peak was predicted, fastest predicted first; ``*`` marks the chosen."""
    size = lambda n: "-" if n is None else format_bytes(n)
    rate = lambda v: "-" if v is None else f"{v:.0f}"
    return [(c.plan.recipe + (" *" if c is result.best else ""), size(c.lower_bound_bytes),
             size(c.predicted_peak_bytes), "yes" if c.fits else "no", rate(c.predicted_tokens_per_s),
             rate(c.measured_tokens_per_s), size(c.measured_peak_bytes))
            for c in result.candidates if c.predicted_peak_bytes is not None]


def training_report(result, model: str) -> str:
    """Markdown: the chosen training plan, how the search got there, and the table of `training_rows`."""
    work, best = result.workload, result.best
    shown = training_rows(result)
    bound = sum(c.skipped is not None and c.skipped.startswith("its weights") for c in result.candidates)
    lines = [
        f"# memfit optimize --mode train: {model}",
        "",
        f"Budget: {format_bytes(result.budget_bytes)}{' per rank' if work.ranks > 1 else ''} for a training step "
        f"of {work.batch_size} sequences of {work.seq_len} tokens"
        f"{f' over {work.ranks} processes' if work.ranks > 1 else ''}. Chosen: `{best.plan.recipe}`, "
        f"{best.measured_tokens_per_s:.0f} tokens/s measured "
        f"({best.predicted_tokens_per_s:.0f} predicted), tracked peak{' (largest rank)' if work.ranks > 1 else ''} "
        f"{format_bytes(best.measured_peak_bytes)} "
        f"(predicted {format_bytes(best.predicted_peak_bytes)}).",
        "",
        f"{len(result.candidates)} plans: {bound} set aside by their lower bound, {len(shown)} predicted "
        "(fastest first, until enough fit), the rest slower than the plans verified.",
        "",
        "| " + " | ".join(TRAINING_HEADER) + " |",
        "|" + "---|" * len(TRAINING_HEADER),
        *("| " + " | ".join(row) + " |" for row in shown),
        "",
    ]
    return "\n".join(lines)
