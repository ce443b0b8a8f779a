"""Timing helpers and the result types shared by every benchmark."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: str
    target: str  # docs/performance-targets.md's target, as text ("-" if none)
    limit_name: str  # what the ratio is held against
    limit_value: float
    decimals: int = 0  # digits after the point when printing value and limit

    @property
    def ratio(self) -> float:
        return self.value / self.limit_value if self.limit_value else float("nan")


@dataclass(frozen=True, slots=True)
class Distribution:
    """Every latency sample of one measurement, kept so the report can show its tail."""

    name: str  # what travelled where, e.g. "native->Matrix"
    samples_ms: tuple[float, ...]
    condition: str  # how it was driven, e.g. "1,000 msgs/s"
    target_ms: float | None = None  # drawn as a line; None: no target to draw
    target_label: str = "target"

    def percentile(self, p: float) -> float:
        return percentile(sorted(self.samples_ms), p)


@dataclass(slots=True)
class Results:
    """What one benchmark returns: its table rows and any latency distributions."""

    figures: list[Figure] = field(default_factory=list)
    distributions: list[Distribution] = field(default_factory=list)


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of already sorted values (NaN if none)."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def rate(fn: Callable[[], object], batch: int, repeats: int) -> float:
    """Best-of-``repeats`` calls per second of ``fn``, timed in batches of ``batch`` calls.

    Best-of rather than mean: on a shared 2-core machine the fastest batch is the one least
    disturbed by other work, and both sides of every ratio are measured the same way.
    """
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            best = min(best, time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return batch / best


TABLE_HEAD = ("figure", "measured", "target", "limit (same run)", "ratio")


def table_rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    return [
        (
            f.name,
            f"{f.value:,.{f.decimals}f} {f.unit}",
            f.target,
            f"{f.limit_name} = {f.limit_value:,.{f.decimals}f} {f.unit}",
            f"{f.ratio:.2f}",
        )
        for f in figures
    ]


def format_rows(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """``head`` and ``rows`` as aligned plain-text lines, a rule under the head."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, tuple("-" * w for w in widths), *rows]
    ]


def print_rows(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    for line in format_rows(head, rows):
        print(line)


def format_table(figures: list[Figure]) -> list[str]:
    """The result table: each figure, its target, its limit and the ratio to it."""
    return format_rows(TABLE_HEAD, table_rows(figures))


def print_table(figures: list[Figure]) -> None:
    for line in format_table(figures):
        print(line)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (NaN where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
