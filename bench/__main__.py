"""``python -m bench [--full] [--only NAME]``: run the benchmarks and print one table."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

from . import crypto, frames, mls, server
from .common import Figure, print_table

BENCHMARKS: dict[str, Callable[[bool], list[Figure]]] = {
    "crypto": crypto.run,
    "frames": frames.run,
    "mls": mls.run,
    "server": server.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="longer runs, steadier figures")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args()
    mode = "full" if args.full else "quick"
    print(
        f"kalandra benchmarks ({mode}) on {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores"
    )
    figures: list[Figure] = []
    for name in args.only or sorted(BENCHMARKS):
        figures += BENCHMARKS[name](not args.full)
    print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
