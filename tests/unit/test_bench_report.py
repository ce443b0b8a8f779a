"""The benchmark report: a Markdown table and a PNG of the figures and latency distributions,
each beside the previous run's (kept in report.json), from synthetic samples (nothing here is
timed)."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from bench.__main__ import _write_report
from bench.common import Distribution, Figure, Results, format_table
from bench.report import Run, load_run, markdown, save_run, write_report

FIGURES = [
    Figure("header parse", 2_500_000, "/s", ">= 1,000,000 /s", "unpack_from(128 B)", 5e6),
    Figure("native->native p99 @ 1,000/s", 3.25, "ms", "p99 < 10 ms", "target", 10.0, 2),
]


def _samples(rng: random.Random, n: int, median_ms: float) -> tuple[float, ...]:
    """A long-tailed (log-normal) latency sample."""
    return tuple(rng.lognormvariate(0, 0.6) * median_ms for _ in range(n))


def _distributions() -> list[Distribution]:
    rng = random.Random(7)
    return [
        Distribution("native->native", _samples(rng, 2_000, 1.2), "1,000 msgs/s", 10.0),
        Distribution("native->Matrix", _samples(rng, 100, 60.0), "20 msgs/s", 250.0),
        Distribution("Matrix->native", _samples(rng, 100, 40.0), "20 msgs/s"),
    ]


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every chunk of a PNG, each CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def test_the_report_is_a_valid_png_and_a_table(tmp_path: Path) -> None:
    written = write_report(
        tmp_path, "kalandra benchmarks (quick)", "latency: quick", FIGURES, _distributions()
    )
    assert written == [tmp_path / "report.md", tmp_path / "report.json", tmp_path / "report.png"]
    _assert_drawn(tmp_path / "report.png", 1000, 800)

    text = (tmp_path / "report.md").read_text()
    assert "| header parse | 2,500,000 /s | >= 1,000,000 /s |" in text
    assert "| 0.50 |" in text
    assert "| 0.33 |" in text
    for name in ("native->native", "native->Matrix", "Matrix->native"):
        assert f"| {name} |" in text
    assert "| 2,000 |" in text  # N of the native distribution


def _assert_drawn(png: Path, min_width: int, min_height: int) -> None:
    chunks = _png_chunks(png.read_bytes())
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width >= min_width
    assert height >= min_height
    image = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(set(image)) > 16  # drawn, not a blank canvas


def test_without_distributions_the_png_shows_the_figures(tmp_path: Path) -> None:
    written = write_report(tmp_path, "header", "title", FIGURES, [])
    assert written == [tmp_path / "report.md", tmp_path / "report.json", tmp_path / "report.png"]
    _assert_drawn(tmp_path / "report.png", 1000, 150)


def test_with_nothing_measured_only_the_table_and_the_data_are_written(tmp_path: Path) -> None:
    written = write_report(tmp_path, "header", "title", [], [])
    assert written == [tmp_path / "report.md", tmp_path / "report.json"]
    assert not (tmp_path / "report.png").exists()


def test_a_run_is_kept_and_read_back_whole(tmp_path: Path) -> None:
    run = Run("kalandra benchmarks (quick), earlier", tuple(FIGURES), tuple(_distributions()))
    save_run(tmp_path / "report.json", run)
    back = load_run(tmp_path / "report.json")
    assert back is not None
    assert back.header == run.header
    assert back.figures == run.figures
    assert [d.name for d in back.distributions] == [d.name for d in run.distributions]
    for old, new in zip(run.distributions, back.distributions, strict=True):
        assert new.samples_ms == pytest.approx(old.samples_ms, abs=1e-4)
        assert (new.condition, new.target_ms) == (old.condition, old.target_ms)


@pytest.mark.parametrize("kept", ["", "{not json", '{"version": 99}', '{"version": 1}', "[]"])
def test_an_unreadable_previous_run_is_no_previous_run(tmp_path: Path, kept: str) -> None:
    (tmp_path / "report.json").write_text(kept)
    assert load_run(tmp_path / "report.json") is None
    assert load_run(tmp_path / "missing.json") is None
    write_report(tmp_path, "now", "title", FIGURES, _distributions())
    text = (tmp_path / "report.md").read_text()
    assert "previous" not in text
    assert "| header parse | 2,500,000 /s | >= 1,000,000 /s |" in text


def test_the_second_run_is_shown_beside_the_first(tmp_path: Path) -> None:
    write_report(tmp_path, "first run", "title", FIGURES, _distributions())
    assert "previous" not in (tmp_path / "report.md").read_text()  # nothing before it
    faster = [
        Figure("header parse", 3_000_000, "/s", ">= 1,000,000 /s", "unpack_from(128 B)", 5e6),
        Figure("bridge backfill, 300 msgs", 45.0, "msgs/s", ">= 0.90 x limit", "AS send", 50, 1),
    ]
    rng = random.Random(11)
    second = [Distribution("native->native", _samples(rng, 500, 0.8), "1,000 msgs/s", 10.0)]
    written = write_report(tmp_path, "second run", "title", faster, second)
    assert written[-1] == tmp_path / "report.png"
    _assert_drawn(tmp_path / "report.png", 1000, 800)

    text = (tmp_path / "report.md").read_text()
    assert 'Previous run (column "previous"): first run' in text
    assert "| previous (ratio) |" in text
    # The figure both runs have: the first run's value and ratio beside the second's.
    assert "| header parse | 3,000,000 /s |" in text
    assert "| 0.60 | 2,500,000 /s (0.50) |" in text
    assert "| 0.90 | - |" in text  # a new figure: nothing before it
    assert "| previous p50 / p99 |" in text
    first_native = _distributions()[0]
    p50, p99 = (first_native.percentile(p) for p in (50, 99))
    assert f"| {p50:,.2f} / {p99:,.2f} |" in text

    kept = load_run(tmp_path / "report.json")
    assert kept is not None
    assert kept.header == "second run"  # the next run compares with this one
    assert [f.name for f in kept.figures] == [f.name for f in faster]


def test_the_printed_table_has_every_figure_aligned() -> None:
    lines = format_table(FIGURES)
    assert lines[0].split() == ["figure", "measured", "target", "limit", "(same", "run)", "ratio"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("header parse")
    assert lines[2].endswith("0.50")
    assert lines[3].endswith("0.33")
    column = lines[0].index("ratio")
    assert lines[2].rindex("0.50") == lines[3].rindex("0.33") == column


def test_a_distribution_without_samples_is_reported_not_drawn() -> None:
    empty = Distribution("Matrix->native", (), "20 msgs/s")
    text = markdown("header", FIGURES, [empty])
    assert "| Matrix->native | 20 msgs/s | 0 | nan | nan | nan | nan | - |" in text


def test_a_report_that_cannot_be_written_is_printed_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = Results(FIGURES, _distributions())
    occupied = tmp_path / "occupied"  # a file where the report's directory would go
    occupied.write_text("")
    _write_report(occupied, "header", "title", results)
    assert "report: not fully written (FileExistsError" in capsys.readouterr().out


def test_the_report_directory_is_made(tmp_path: Path) -> None:
    results = Results(FIGURES, _distributions())
    _write_report(tmp_path / "new" / "dir", "header", "title", results)
    assert (tmp_path / "new" / "dir" / "report.md").is_file()
