"""The official MLS interop vectors, run through kalandra_core.mls (and its CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalandra_core.mls import _lib
from kalandra_core.mls.conformance import UnknownVectorFileError, run_directory

MLS_VECTORS = Path(__file__).parent.parent / "vectors" / "mls"
REPO = Path(__file__).parent.parent.parent

# Cases per file in mlswg/mls-implementations test-vectors (docs/mls-library.md).
EXPECTED_CASES = {
    "tree-math.json": 10,
    "crypto-basics.json": 7,
    "secret-tree.json": 21,
    "message-protection.json": 7,
    "messages.json": 300,
    "deserialization.json": 14,
    "psk_secret.json": 77,
    "transcript-hashes.json": 7,
    "welcome.json": 7,
    "tree-operations.json": 5,
    "tree-validation.json": 98,
    "treekem.json": 77,
    "passive-client-welcome.json": 56,
    "passive-client-handling-commit.json": 91,
    "passive-client-random.json": 1,
    "key-schedule.json": 7,
}


def run_cli(directory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "kalandra_core.mls.conformance", str(directory)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
        timeout=300,
    )


def test_all_official_vectors_pass() -> None:
    report = run_directory(MLS_VECTORS)
    failures = [f"{x.file}[{x.index}]: {x.reason}" for r in report.files for x in r.failures]
    assert failures == []
    assert {r.name: r.passed for r in report.files} == EXPECTED_CASES
    assert (report.passed, report.failed) == (785, 0)


def test_cli_runs_a_directory(tmp_path: Path) -> None:
    shutil.copy(MLS_VECTORS / "tree-math.json", tmp_path)
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "10 passed, 0 failed"


def test_tampered_vector_is_reported_as_failed(tmp_path: Path) -> None:
    cases = json.loads((MLS_VECTORS / "crypto-basics.json").read_text())
    out = bytearray.fromhex(cases[2]["derive_secret"]["out"])
    out[0] ^= 0x01
    cases[2]["derive_secret"]["out"] = out.hex()
    (tmp_path / "crypto-basics.json").write_text(json.dumps(cases))

    result = run_cli(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "  FAIL crypto-basics.json case 2: derive_secret.out" in lines
    assert lines[-1] == "6 passed, 1 failed"


def test_unknown_file_is_an_error(tmp_path: Path) -> None:
    shutil.copy(MLS_VECTORS / "tree-math.json", tmp_path)
    (tmp_path / "not-a-vector.json").write_text("[]")
    with pytest.raises(UnknownVectorFileError, match=r"not-a-vector\.json"):
        run_directory(tmp_path)
    result = run_cli(tmp_path)
    assert result.returncode == 2
    assert "not-a-vector.json" in result.stderr


def test_empty_directory_is_not_a_pass(tmp_path: Path) -> None:
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == "0 passed, 0 failed"


def test_correction_refuses_a_changed_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_lib._AUDITED_SOURCES, "MLSGroup.from_welcome", "0" * 64)
    with pytest.raises(_lib.LibraryChangedError, match="rfc9420 changed: correction 'x'"):
        _lib._require_audited(_lib.MLSGroup.from_welcome, "x")


def test_exporter_hashes_the_context() -> None:
    crypto = _lib.crypto_for_suite(1)
    secret = bytes(32)
    rfc = _lib.mls_exporter(crypto, secret, b"label", b"context", 32)
    inner = crypto.derive_secret(secret, b"label")
    assert rfc == crypto.expand_with_label(inner, b"exported", crypto.hash(b"context"), 32)
    assert rfc != crypto.expand_with_label(inner, b"exported", b"context", 32)
