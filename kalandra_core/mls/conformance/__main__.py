"""``python -m kalandra_core.mls.conformance DIR``: run MLS vectors; exit 0 only if all pass."""

from __future__ import annotations

import argparse
import sys

from . import Report, UnknownVectorFileError, run_directory


def _print_report(report: Report) -> None:
    for f in report.files:
        print(f"{f.name}: {f.passed} passed, {f.failed} failed ({f.seconds:.1f} s)")
        for failure in f.failures:
            print(f"  FAIL {failure.file} case {failure.index}: {failure.reason}")
    print(f"{report.passed} passed, {report.failed} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kalandra_core.mls.conformance",
        description="Run the official MLS interop test vectors through kalandra_core.mls.",
    )
    parser.add_argument("directory", help="directory holding the mlswg test-vector JSON files")
    args = parser.parse_args(argv)
    try:
        report = run_directory(args.directory)
    except (UnknownVectorFileError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
