"""The run's report files: the table as Markdown and the latency distributions as a PNG.

The PNG shows each distribution twice: all of them on one percentile plot (latency against
percentile on a scale that stretches the tail, up to the largest sample), and one histogram
each on log axes, so a reader sees both the body and the last few samples. Targets are drawn
as dashed lines. matplotlib is imported only here, with its non-interactive Agg canvas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .common import TABLE_HEAD, Distribution, Figure, table_rows

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
_TAIL_TICKS = (
    (0.0, "0%"),
    (math.log10(2), "50%"),
    (1, "90%"),
    (2, "99%"),
    (3, "99.9%"),
    (4, "99.99%"),
    (5, "99.999%"),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _ms(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def summary_rows(distributions: Sequence[Distribution]) -> list[tuple[str, ...]]:
    """One row per distribution: name, condition, N, p50, p99, p99.9, max, target (ms)."""
    rows: list[tuple[str, ...]] = []
    for d in distributions:
        values = sorted(d.samples_ms)
        rows.append(
            (
                d.name,
                d.condition,
                f"{len(values):,}",
                *(_ms(d.percentile(p)) for p in (50, 99, 99.9)),
                _ms(values[-1]) if values else "nan",
                "-" if d.target_ms is None else f"{d.target_label}: {d.target_ms:g}",
            )
        )
    return rows


SUMMARY_HEAD = ("latency (ms)", "driven at", "N", "p50", "p99", "p99.9", "max", "line drawn")


def markdown(header: str, figures: Sequence[Figure], distributions: Sequence[Distribution]) -> str:
    def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
        return [
            "| " + " | ".join(_cell(c) for c in head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows),
        ]

    lines = ["# Kalandra benchmarks", "", header, ""]
    lines += table(TABLE_HEAD, table_rows(list(figures)))
    if distributions:
        lines += ["", "## Latency distributions (report.png)", ""]
        lines += table(SUMMARY_HEAD, summary_rows(distributions))
    return "\n".join(lines) + "\n"


def write_markdown(
    path: Path, header: str, figures: Sequence[Figure], distributions: Sequence[Distribution]
) -> None:
    path.write_text(markdown(header, figures, distributions), encoding="utf-8")


def _tail_x(values: list[float]) -> list[float]:
    """x = -log10(1 - q) for sample i (sorted) at q = (i + 1) / n: 1 is p90, 2 p99, 3 p99.9.
    The largest sample (q = 1) is put a little past the last finite point."""
    n = len(values)
    xs = [-math.log10(1 - (i + 1) / n) for i in range(n - 1)]
    xs.append(math.log10(n) + 0.3)
    return xs


def plot_distributions(path: Path, title: str, distributions: Sequence[Distribution]) -> None:
    """Draw every distribution (those without samples are named as such) into ``path``."""
    from matplotlib.figure import Figure as Canvas  # Agg, no pyplot state or display
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    shown = [d for d in distributions if d.samples_ms]
    if not shown:
        raise ValueError("no latency samples to draw")
    fig = Canvas(figsize=(5 * max(3, len(shown)), 10), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, len(shown), height_ratios=(1.2, 1))
    fig.suptitle(title, fontsize=13)

    tail = fig.add_subplot(grid[0, :])
    tail.set_title("latency by percentile (every sample; the last step is the maximum)")
    tail.set_yscale("log")
    tail.set_ylabel("latency (ms)")
    tail.set_xlabel("percentile")
    tail.grid(True, which="both", alpha=0.3)
    right = 0.0
    for k, d in enumerate(shown):
        color = _COLORS[k % len(_COLORS)]
        values = sorted(d.samples_ms)
        xs = [0.0, *_tail_x(values)]
        ys = [values[0], *values]
        right = max(right, xs[-1])
        tail.plot(
            xs,
            ys,
            drawstyle="steps-pre",
            color=color,
            label=(
                f"{d.name} ({d.condition}, N={len(values):,}): p50 {_ms(d.percentile(50))}"
                f" / p99 {_ms(d.percentile(99))} / max {_ms(values[-1])} ms"
            ),
        )
        tail.plot(xs[-1:], ys[-1:], "o", color=color, markersize=4)
        if d.target_ms is not None:
            tail.axhline(
                d.target_ms,
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"{d.name} {d.target_label}: {d.target_ms:g} ms",
            )
    ticks = [(x, label) for x, label in _TAIL_TICKS if x <= right]
    tail.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
    tail.set_xlim(0, right + 0.05)
    tail.yaxis.set_major_formatter(plain)
    tail.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=9)
    for name in (d.name for d in distributions if not d.samples_ms):
        tail.annotate(f"{name}: no samples", xy=(0.99, 0.02), xycoords="axes fraction")

    for k, d in enumerate(shown):
        color = _COLORS[k % len(_COLORS)]
        values = sorted(d.samples_ms)
        ax = fig.add_subplot(grid[1, k])
        ax.set_title(f"{d.name}, N={len(values):,}, {d.condition}", fontsize=10)
        low, high = max(values[0], 1e-3), max(values[-1], 1e-3)
        if high > low * 1.01:
            bins = [low * (high / low) ** (i / 40) for i in range(41)]
            ax.set_xscale("log")
        else:  # all (nearly) equal: a log axis would have no span
            bins = [low * 0.9 + i * low * 0.2 / 10 for i in range(11)]
        ax.hist([max(v, 1e-3) for v in values], bins=bins, color=color, log=True)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("messages (log)")
        for p, style in ((50, "-"), (99, "--"), (99.9, ":")):
            ax.axvline(
                d.percentile(p),
                color="black",
                linestyle=style,
                linewidth=1,
                label=f"p{p:g} {_ms(d.percentile(p))} ms",
            )
        if d.target_ms is not None:
            ax.axvline(
                d.target_ms,
                color="red",
                linestyle="--",
                linewidth=1.5,
                label=f"{d.target_label} {d.target_ms:g} ms",
            )
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":  # label 1-2-5 steps: a span may hold no power of 10
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path)


def write_report(
    out_dir: Path,
    header: str,
    title: str,
    figures: Sequence[Figure],
    distributions: Sequence[Distribution],
) -> list[Path]:
    """Write report.md and (when there are distributions) report.png into ``out_dir``; the
    paths written. Raises what plotting raises, after the Markdown is written."""
    md = out_dir / "report.md"
    write_markdown(md, header, figures, distributions)
    if not distributions:
        return [md]
    png = out_dir / "report.png"
    plot_distributions(png, title, distributions)
    return [md, png]
