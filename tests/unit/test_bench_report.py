"""The benchmark report: a Markdown table and a PNG of latency distributions, from synthetic
samples (nothing here is timed)."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from bench.__main__ import _write_report
from bench.common import Distribution, Figure, Results, format_table
from bench.report import markdown, write_report

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
    assert written == [tmp_path / "report.md", tmp_path / "report.png"]

    chunks = _png_chunks((tmp_path / "report.png").read_bytes())
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width >= 1000
    assert height >= 800
    image = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(set(image)) > 16  # drawn, not a blank canvas

    text = (tmp_path / "report.md").read_text()
    assert "| header parse | 2,500,000 /s | >= 1,000,000 /s |" in text
    assert "| 0.50 |" in text
    assert "| 0.33 |" in text
    for name in ("native->native", "native->Matrix", "Matrix->native"):
        assert f"| {name} |" in text
    assert "| 2,000 |" in text  # N of the native distribution


def test_without_distributions_only_the_table_is_written(tmp_path: Path) -> None:
    written = write_report(tmp_path, "header", "title", FIGURES, [])
    assert written == [tmp_path / "report.md"]
    assert not (tmp_path / "report.png").exists()


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
    _write_report(tmp_path / "missing", "header", "title", results)
    assert "report: not fully written (FileNotFoundError" in capsys.readouterr().out
