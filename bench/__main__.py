"""``python -m bench [--full] [--only NAME] [--out DIR]``: run the benchmarks, print one table,
and write the report into DIR: report.md (the table), report.png (each figure's ratio to its
limit and the latency distributions) and report.json (what the next run shows as "previous"),
each beside the previous run's."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections.abc import Callable
from pathlib import Path

from . import (
    bridge,
    bridge_backfill,
    bridge_encrypted,
    bridge_ghost_devices,
    bridge_many,
    bridge_media,
    cluster,
    crypto,
    frames,
    media,
    mls,
    server,
)
from .common import Results, print_rows, print_table
from .report import SUMMARY_HEAD, summary_rows, write_report

# In the order they run and are tabled: from the wire format up to the whole bridge.
BENCHMARKS: dict[str, Callable[[bool], Results]] = {
    "frames": frames.run,
    "crypto": crypto.run,
    "mls": mls.run,
    "server": server.run,
    "cluster": cluster.run,
    "media": media.run,
    "bridge": bridge.run,
    "bridge-media": bridge_media.run,
    "bridge-encrypted": bridge_encrypted.run,
    "bridge-ghost-devices": bridge_ghost_devices.run,
    "bridge-backfill": bridge_backfill.run,
    "bridge-many": bridge_many.run,
    "bridge-startup": bridge_many.run_startup,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="longer runs, steadier figures")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent, help="report directory (bench/)"
    )
    args = parser.parse_args()
    mode = "full" if args.full else "quick"
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = (
        f"kalandra benchmarks ({mode}) on {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores, {when}"
    )
    print(header)
    results = Results()
    for name in args.only or list(BENCHMARKS):
        try:
            one = BENCHMARKS[name](not args.full)
        except BaseException:
            # A crash fails the run; what was measured before it is still shown.
            print(f"benchmark {name} crashed; figures measured before it:")
            print_table(results.figures)
            raise
        results.figures += one.figures
        results.distributions += one.distributions

    print()
    print_table(results.figures)
    if results.distributions:
        print()
        print_rows(SUMMARY_HEAD, summary_rows(results.distributions))
    _write_report(args.out, header, f"Kalandra benchmarks: {mode} mode, {when}", results)
    return 0


def _write_report(out: Path, header: str, title: str, results: Results) -> None:
    """The report is a by-product: failing to write it is printed, never fails the run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = write_report(out, header, title, results.figures, results.distributions)
    except Exception as exc:
        print(f"report: not fully written ({type(exc).__name__}: {exc})")
        return
    print(f"report: {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    raise SystemExit(main())
