"""Run the official MLS interop test vectors (mlswg/mls-implementations) through our MLS layer.

``python -m kalandra_core.mls.conformance DIR`` checks every case of every vector file in DIR;
:func:`run_directory` does the same in-process. A case passes only if every output the vector
gives, and that our layer can compute, matches; a case that raises is a failure with its reason.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._basic import (
    check_crypto_basics,
    check_deserialization,
    check_key_schedule,
    check_psk_secret,
    check_secret_tree,
    check_transcript_hashes,
    check_tree_math,
)
from ._common import Check, Mismatch
from ._framing import check_message_protection, check_messages, check_welcome
from ._passive import check_passive_client
from ._trees import check_tree_operations, check_tree_validation, check_treekem

__all__ = [
    "CHECKS",
    "CaseFailure",
    "FileResult",
    "Report",
    "UnknownVectorFileError",
    "run_directory",
]

# File name (as published by mlswg) -> the check run on each of its cases.
CHECKS: dict[str, Check] = {
    "tree-math.json": check_tree_math,
    "crypto-basics.json": check_crypto_basics,
    "secret-tree.json": check_secret_tree,
    "message-protection.json": check_message_protection,
    "messages.json": check_messages,
    "deserialization.json": check_deserialization,
    "psk_secret.json": check_psk_secret,
    "transcript-hashes.json": check_transcript_hashes,
    "welcome.json": check_welcome,
    "tree-operations.json": check_tree_operations,
    "tree-validation.json": check_tree_validation,
    "treekem.json": check_treekem,
    "passive-client-welcome.json": check_passive_client,
    "passive-client-handling-commit.json": check_passive_client,
    "passive-client-random.json": check_passive_client,
    "key-schedule.json": check_key_schedule,
}


class UnknownVectorFileError(ValueError):
    """The directory holds a file this runner has no check for."""


@dataclass(frozen=True)
class CaseFailure:
    file: str
    index: int
    reason: str


@dataclass
class FileResult:
    name: str
    passed: int = 0
    failures: list[CaseFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)


@dataclass
class Report:
    files: list[FileResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(f.passed for f in self.files)

    @property
    def failed(self) -> int:
        return sum(f.failed for f in self.files)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


# Library error messages could quote key material; long hex runs are cut from reasons.
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_MAX_REASON = 200


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, Mismatch) else f"{type(exc).__name__}: {exc}"
    text = _HEX_RUN.sub("<hex>", " ".join(text.split()))
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def run_file(path: Path) -> FileResult:
    check = CHECKS.get(path.name)
    if check is None:
        raise UnknownVectorFileError(f"no conformance check for {path.name!r}")
    result = FileResult(path.name)
    start = time.perf_counter()
    cases = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(cases, list):
        raise ValueError(f"{path.name}: expected a JSON list of test cases")
    for index, case in enumerate(cases):
        try:
            check(case)
        except Exception as exc:  # one bad case must not stop the run
            result.failures.append(CaseFailure(path.name, index, _reason(exc)))
        else:
            result.passed += 1
    result.seconds = time.perf_counter() - start
    return result


def run_directory(directory: Path | str) -> Report:
    """Run every case of every vector file in ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    paths = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    unknown = [p.name for p in paths if p.name not in CHECKS or not p.is_file()]
    if unknown:
        raise UnknownVectorFileError(
            f"unknown vector file(s) in {root}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(CHECKS))})"
        )
    return Report([run_file(p) for p in paths])
