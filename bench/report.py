"""The run's report files: the table as Markdown, the figures and the latency distributions as
a PNG, each beside the previous run's.

Each run keeps what it measured in ``report.json`` (figures and every latency sample); the next
run reads it before writing its own, and shows it as "previous": a column of the table, a grey
bar beside each figure's ratio to its limit, and the same distribution drawn dashed (percentile
plot) or as a grey outline (histogram) under the new one. A figure or distribution is matched
to the previous one by name; without a previous run (or with an unreadable one) the report
shows the current run alone. The PNG shows each distribution twice: all of them on one
percentile plot (latency against percentile on a scale that stretches the tail, up to the
largest sample), and one histogram each on log axes, so a reader sees both the body and the
last few samples. Targets are drawn as dashed lines. matplotlib is imported only here, with
its non-interactive Agg canvas.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import TABLE_HEAD, Distribution, Figure, percentile, table_rows

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


_PREVIOUS_COLOR = "tab:gray"
_JSON_VERSION = 1


@dataclass(frozen=True, slots=True)
class Run:
    """What one run measured, as kept in ``report.json``."""

    header: str
    figures: tuple[Figure, ...] = ()
    distributions: tuple[Distribution, ...] = ()

    def figure(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    def distribution(self, name: str) -> Distribution | None:
        return next((d for d in self.distributions if d.name == name), None)


def save_run(path: Path, run: Run) -> None:
    """``run`` into ``path`` (written aside, then renamed: a crash leaves the old one whole)."""
    data = {
        "version": _JSON_VERSION,
        "header": run.header,
        "figures": [asdict(f) for f in run.figures],
        "distributions": [
            {**asdict(d), "samples_ms": [round(v, 4) for v in d.samples_ms]}
            for d in run.distributions
        ],
    }
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data), encoding="utf-8")
    os.replace(part, path)


def load_run(path: Path) -> Run | None:
    """The run kept in ``path``; None if there is none or it cannot be read as one."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _JSON_VERSION:
            return None
        figures = tuple(Figure(**f) for f in data["figures"])
        distributions = tuple(
            Distribution(**{**d, "samples_ms": tuple(float(v) for v in d["samples_ms"])})
            for d in data["distributions"]
        )
        return Run(str(data["header"]), figures, distributions)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


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
PREVIOUS_HEAD = "previous"


def _previous_figure(figure: Figure, previous: Run | None) -> str:
    """The previous run's value of the same figure, with its ratio; "-" if it had none."""
    old = previous.figure(figure.name) if previous is not None else None
    if old is None:
        return "-"
    return f"{old.value:,.{old.decimals}f} {old.unit} ({old.ratio:.2f})"


def _previous_distribution(d: Distribution, previous: Run | None) -> str:
    """The previous run's p50 / p99 of the same distribution (ms); "-" if it had none."""
    old = previous.distribution(d.name) if previous is not None else None
    if old is None or not old.samples_ms:
        return "-"
    return f"{_ms(old.percentile(50))} / {_ms(old.percentile(99))}"


def markdown(
    header: str,
    figures: Sequence[Figure],
    distributions: Sequence[Distribution],
    previous: Run | None = None,
) -> str:
    """The report's text; with ``previous``, a column of its figures (value and ratio) and of
    its p50 / p99 beside each row."""

    def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
        return [
            "| " + " | ".join(_cell(c) for c in head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows),
        ]

    lines = ["# Kalandra benchmarks", "", header, ""]
    if previous is not None:
        lines += [f'Previous run (column "{PREVIOUS_HEAD}"): {previous.header}', ""]
    rows = table_rows(list(figures))
    if previous is None:
        lines += table(TABLE_HEAD, rows)
    else:
        rows = [(*r, _previous_figure(f, previous)) for r, f in zip(rows, figures, strict=True)]
        lines += table((*TABLE_HEAD, f"{PREVIOUS_HEAD} (ratio)"), rows)
    if distributions:
        lines += ["", "## Latency distributions (report.png)", ""]
        summary = summary_rows(distributions)
        if previous is None:
            lines += table(SUMMARY_HEAD, summary)
        else:
            summary = [
                (*r, _previous_distribution(d, previous))
                for r, d in zip(summary, distributions, strict=True)
            ]
            lines += table((*SUMMARY_HEAD, f"{PREVIOUS_HEAD} p50 / p99"), summary)
    return "\n".join(lines) + "\n"


def write_markdown(
    path: Path,
    header: str,
    figures: Sequence[Figure],
    distributions: Sequence[Distribution],
    previous: Run | None = None,
) -> None:
    path.write_text(markdown(header, figures, distributions, previous), encoding="utf-8")


def _tail_x(values: list[float]) -> list[float]:
    """x = -log10(1 - q) for sample i (sorted) at q = (i + 1) / n: 1 is p90, 2 p99, 3 p99.9.
    The largest sample (q = 1) is put a little past the last finite point."""
    n = len(values)
    xs = [-math.log10(1 - (i + 1) / n) for i in range(n - 1)]
    xs.append(math.log10(n) + 0.3)
    return xs


def _ratio_panel(ax: Any, figures: Sequence[Figure], previous: Run | None) -> None:
    """Each figure's ratio to its limit on a log axis (1 marked): this run's as a dot, the
    previous run's as a grey dot on the same line, joined to it."""
    from matplotlib.ticker import FuncFormatter

    ys = list(range(len(figures)))[::-1]  # the first figure on top, as in the table
    drawn: list[float] = [1.0]
    for y, f in zip(ys, figures, strict=True):
        old = previous.figure(f.name) if previous is not None else None
        now = f.ratio if math.isfinite(f.ratio) and f.ratio > 0 else None
        then = (
            old.ratio if old is not None and math.isfinite(old.ratio) and old.ratio > 0 else None
        )
        if now is not None and then is not None:
            ax.plot([then, now], [y, y], color=_PREVIOUS_COLOR, linewidth=1, zorder=1)
        if then is not None:
            ax.plot([then], [y], "o", color=_PREVIOUS_COLOR, markersize=7, zorder=2)
            drawn.append(then)
        if now is not None:
            ax.plot([now], [y], "o", color="tab:blue", markersize=7, zorder=3)
            drawn.append(now)
        text = (
            f"{f.value:,.{f.decimals}f} {f.unit} / {f.limit_value:,.{f.decimals}f} = {f.ratio:.2f}"
        )
        if old is not None:
            text += (
                f"  (previous {old.value:,.{old.decimals}f} / {old.limit_value:,.{old.decimals}f}"
            )
            text += f" = {old.ratio:.2f})"
        ax.annotate(
            f"  {text}",
            xy=(1, y),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="center",
            ha="left",
        )
    ax.set_yticks(ys, [f.name for f in figures], fontsize=8)
    ax.set_ylim(-0.7, len(figures) - 0.3)
    ax.set_xscale("log")
    ax.set_xlim(min(drawn) / 1.5, max(drawn) * 1.5)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("measured / limit of the same run (log axis)")
    ax.set_title(
        "figures: ratio to their limit, this run (blue)"
        + (" and the previous one (grey)" if previous is not None else "")
        + "; targets in report.md"
    )
    ax.grid(True, axis="x", which="both", alpha=0.3)


def plot_report(
    path: Path,
    title: str,
    figures: Sequence[Figure],
    distributions: Sequence[Distribution],
    previous: Run | None = None,
) -> None:
    """Draw the figures' ratios and every distribution (those without samples are named as
    such), each beside ``previous``'s of the same name, into ``path``."""
    from matplotlib.figure import Figure as Canvas  # Agg, no pyplot state or display
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    shown = [d for d in distributions if d.samples_ms]
    if not shown and not figures:
        raise ValueError("no figures and no latency samples to draw")
    columns = max(3, len(shown))
    heights = ([max(2.0, 0.32 * len(figures) + 1.2)] if figures else []) + (
        [6.0, 5.0] if shown else []
    )
    fig = Canvas(figsize=(5 * columns, sum(heights)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(len(heights), columns, height_ratios=heights)
    if previous is not None:
        title = f"{title}\n(grey / dashed: previous run, {previous.header})"
    fig.suptitle(title, fontsize=13)
    if figures:
        _ratio_panel(fig.add_subplot(grid[0, :]), figures, previous)
    if not shown:
        fig.savefig(path)
        return
    top = 1 if figures else 0

    tail = fig.add_subplot(grid[top, :])
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
        old = previous.distribution(d.name) if previous is not None else None
        if old is not None and old.samples_ms:
            old_values = sorted(old.samples_ms)
            old_xs = [0.0, *_tail_x(old_values)]
            right = max(right, old_xs[-1])
            tail.plot(
                old_xs,
                [old_values[0], *old_values],
                drawstyle="steps-pre",
                color=color,
                linestyle="--",
                alpha=0.6,
                label=(
                    f"{d.name}, previous ({old.condition}, N={len(old_values):,}): p50"
                    f" {_ms(old.percentile(50))} / p99 {_ms(old.percentile(99))} / max"
                    f" {_ms(old_values[-1])} ms"
                ),
            )
        if d.target_ms is not None:
            tail.axhline(
                d.target_ms,
                color=color,
                linestyle=":",
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
        old = previous.distribution(d.name) if previous is not None else None
        old_values = sorted(old.samples_ms) if old is not None else []
        ax = fig.add_subplot(grid[top + 1, k])
        ax.set_title(f"{d.name}, N={len(values):,}, {d.condition}", fontsize=10)
        both = values + old_values
        low, high = max(min(both), 1e-3), max(max(both), 1e-3)
        if high > low * 1.01:
            bins = [low * (high / low) ** (i / 40) for i in range(41)]
            ax.set_xscale("log")
        else:  # all (nearly) equal: a log axis would have no span
            bins = [low * 0.9 + i * low * 0.2 / 10 for i in range(11)]
        ax.hist([max(v, 1e-3) for v in values], bins=bins, color=color, log=True)
        if old_values:
            ax.hist(
                [max(v, 1e-3) for v in old_values],
                bins=bins,
                color=_PREVIOUS_COLOR,
                histtype="step",
                linewidth=1.5,
                log=True,
                label=f"previous: N={len(old_values):,}, p99 {_ms(percentile(old_values, 99))} ms",
            )
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


REPORT_JSON = "report.json"


def write_report(
    out_dir: Path,
    header: str,
    title: str,
    figures: Sequence[Figure],
    distributions: Sequence[Distribution],
) -> list[Path]:
    """Write report.md, report.png (when there is anything to draw) and report.json into
    ``out_dir``, each beside the previous run's (read from report.json first); the paths
    written. Raises what plotting raises, after the Markdown and the JSON are written."""
    kept = out_dir / REPORT_JSON
    previous = load_run(kept)
    md = out_dir / "report.md"
    write_markdown(md, header, figures, distributions, previous)
    save_run(kept, Run(header, tuple(figures), tuple(distributions)))
    if not figures and not distributions:
        return [md, kept]
    png = out_dir / "report.png"
    plot_report(png, title, figures, distributions, previous)
    return [md, kept, png]
