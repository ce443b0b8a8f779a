"""The repository explains itself: no tracked file points at design documents that are not in it,
and every ``docs/<name>.md`` a file cites exists (with the section it names, when it names one)."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Places outside the repository that comments once pointed at ("the design", "the digest",
# notes kept elsewhere). Cite docs/ instead, or state the fact.
OUTSIDE = (
    "shared/notes",
    "DESIGN section",
    "DESIGN.md",
    "digest §",
    "digest section",
    "../shared",
    "notes §",
    "(DESIGN",
    "DESIGN target",
    "library evaluation",
    "epoch-desync.md",
)

DOC_PATH = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)")
# "docs/architecture.md, Epoch rules": the words after the comma name a heading of that file.
DOC_SECTION = re.compile(r"docs/([A-Za-z0-9_.-]+\.md), (?=([^\n]{0,60}(?:\n[^\n]{0,60})?))")
LINK_ANCHOR = re.compile(r"\]\(([A-Za-z0-9_.-]+\.md)#([a-z0-9-]+)\)")


@cache
def tracked() -> dict[str, str]:
    """Every tracked file's text (binary files decoded leniently: they hold no references)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts: dict[str, str] = {}
    for name in out.decode().split("\0"):
        path = REPO / name
        if name and path.is_file():
            texts[name] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


def headings(doc: str) -> list[str]:
    text = (REPO / "docs" / doc).read_text(encoding="utf-8")
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_no_reference_points_outside_the_repository() -> None:
    found = [
        f"{name}:{text.count(chr(10), 0, text.index(needle)) + 1}: {needle!r}"
        for name, text in tracked().items()
        if name != THIS
        for needle in OUTSIDE
        if needle in text
    ]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_cited_doc_exists() -> None:
    cited = {
        (name, doc)
        for name, text in tracked().items()
        if name != THIS
        for doc in DOC_PATH.findall(text)
    }
    assert cited, "no file cites docs/ at all: the pattern is broken"
    missing = [
        f"{name}: docs/{doc}" for name, doc in sorted(cited) if not (REPO / "docs" / doc).is_file()
    ]
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def test_every_cited_section_exists() -> None:
    wrong = []
    for name, text in tracked().items():
        if name == THIS:
            continue
        for doc, after in DOC_SECTION.findall(text):
            if not (REPO / "docs" / doc).is_file():
                continue  # reported by test_every_cited_doc_exists
            # Join a wrapped comment or docstring line back into one phrase.
            phrase = re.sub(r"\s*\n\s*(?:#\s*)?", " ", after)
            if not phrase[:1].isupper():
                continue  # not a section name ("docs/x.md, and ...")
            if not any(phrase.startswith(h) for h in headings(doc)):
                wrong.append(f"{name}: docs/{doc}, {phrase[:40]!r}")
    assert not wrong, "cited sections that are not headings of their doc:\n" + "\n".join(wrong)


def test_links_between_docs_reach_a_heading() -> None:
    wrong = []
    for name, text in tracked().items():
        if not name.startswith("docs/"):
            continue
        for doc, anchor in LINK_ANCHOR.findall(text):
            if anchor not in {slug(h) for h in headings(doc)}:
                wrong.append(f"{name}: {doc}#{anchor}")
    assert not wrong, "links to missing headings:\n" + "\n".join(wrong)
