"""The PNG: one panel per workload, kernel and shim bars at the median with
the min-max spread as error bars, and the shim/kernel ratio in the title.
Panels, not one shared axis: the units differ and the ratios span orders of
magnitude."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from mtcpshim.bench.report import Spread, WorkloadSummary, ensure_parent  # noqa: E402
from mtcpshim.bench.servers import STACKS  # noqa: E402

COLOURS = {"kernel": "#4c72b0", "shim": "#dd8452"}
COLUMNS = 3


def write_png(path: str, summaries: list[WorkloadSummary], title: str) -> None:
    rows = max(1, math.ceil(len(summaries) / COLUMNS))
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(4 * COLUMNS, 3.4 * rows), squeeze=False)
    for ax, summary in zip(axes.flat, summaries):
        _panel(ax, summary)
    for ax in list(axes.flat)[len(summaries):]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    ensure_parent(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _panel(ax, summary: WorkloadSummary) -> None:
    workload = summary.workload
    spreads: list[Spread | None] = [summary.stacks[stack].metrics["throughput"] for stack in STACKS]
    medians = [s.median if s else 0.0 for s in spreads]
    errors = [[s.median - s.low if s else 0.0 for s in spreads], [s.high - s.median if s else 0.0 for s in spreads]]
    bars = ax.bar(STACKS, medians, yerr=errors, capsize=6, color=[COLOURS[stack] for stack in STACKS])
    unit = "req/s" if workload.per_request else "Gbit/s"
    ax.bar_label(bars, labels=[_short(m) if s else "no valid run" for m, s in zip(medians, spreads)], padding=3)
    ax.set_ylabel(unit)
    ax.margins(y=0.2)
    ratio = summary.ratios["throughput"]
    ax.set_title(f"{workload.label}\nshim/kernel {ratio.median:.3g}×" if ratio else workload.label, fontsize=10)


def _short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
