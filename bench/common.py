"""Timing helpers and the result table shared by every benchmark."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    value: float
    unit: str
    target: str  # the DESIGN target, as text ("-" if none)
    limit_name: str  # what the ratio is held against
    limit_value: float
    decimals: int = 0  # digits after the point when printing value and limit

    @property
    def ratio(self) -> float:
        return self.value / self.limit_value if self.limit_value else float("nan")


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


def print_table(figures: list[Figure]) -> None:
    rows = [
        (
            f.name,
            f"{f.value:,.{f.decimals}f} {f.unit}",
            f.target,
            f"{f.limit_name} = {f.limit_value:,.{f.decimals}f} {f.unit}",
            f"{f.ratio:.2f}",
        )
        for f in figures
    ]
    head = ("figure", "measured", "target", "limit (same run)", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
