"""Files holding secrets are 0600 whatever the umask and never written through a symlink."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kalandra_core.private_files import (
    create_private,
    make_sqlite_private,
    write_private,
)


@pytest.fixture(autouse=True)
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_write_private_replaces_a_loose_file_and_a_symlink(tmp_path: Path) -> None:
    loose = tmp_path / "registration.yaml"
    loose.write_text("old")
    os.chmod(loose, 0o644)
    write_private(loose, "new")
    assert (mode(loose), loose.read_text()) == (0o600, "new")
    target = tmp_path / "target"
    target.write_text("untouched")
    link = tmp_path / "link"
    link.symlink_to(target)
    write_private(link, "secret")
    assert not link.is_symlink()
    assert (mode(link), link.read_text()) == (0o600, "secret")
    assert target.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "registration.yaml", "target"]


def test_create_private_refuses_anything_already_there(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched")
    link = tmp_path / "key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        create_private(link, "secret")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        create_private(dangling, "secret")
    assert not (tmp_path / "nowhere").exists()
    assert target.read_text() == "untouched"
    fresh = tmp_path / "fresh"
    create_private(fresh, "secret")
    assert (mode(fresh), fresh.read_text()) == (0o600, "secret")


def test_sqlite_files_are_made_private(tmp_path: Path) -> None:
    db = tmp_path / "kalandra.db"
    make_sqlite_private(db)  # created before SQLite opens it
    assert (mode(db), db.read_bytes()) == (0o600, b"")
    wal = tmp_path / "kalandra.db-wal"
    wal.write_bytes(b"x")
    os.chmod(db, 0o644)
    make_sqlite_private(db)  # an older database and its WAL: tightened
    assert (mode(db), mode(wal)) == (0o600, 0o600)
