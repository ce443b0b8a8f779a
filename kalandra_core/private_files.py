"""Files that hold secrets (tokens, keys, credentials, the database) are created mode 0600,
whatever the umask.

``write_private`` replaces a file atomically with a new 0600 one (an existing file's looser
mode does not survive, and a symlink at the path is replaced, not followed);
``create_private`` makes a new file that must not exist yet (O_EXCL | O_NOFOLLOW: a file or
symlink already there is refused); ``make_private`` makes sure a file exists and is 0600
(SQLite databases, whose -wal and -shm files SQLite creates with the database file's mode;
the configured path may be a symlink).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_private(path: str | os.PathLike[str], data: str | bytes) -> None:
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, MODE)
    try:
        os.fchmod(fd, MODE)  # the umask may have taken bits away; never adds any
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def open_new_private(path: str | os.PathLike[str]) -> int:
    """A new 0600 file open for writing (its descriptor); FileExistsError if anything, a
    symlink too, is at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, MODE)
    os.fchmod(fd, MODE)
    return fd


def create_private(path: str | os.PathLike[str], data: str | bytes) -> None:
    """A new file; FileExistsError if anything (a symlink too) is at ``path``."""
    with os.fdopen(open_new_private(path), "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())


def make_private(path: str | os.PathLike[str]) -> None:
    """``path`` exists, mode 0600 (created empty if missing). A symlink is followed: the
    operator's configured path, which may well point to another disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, MODE)
    try:
        os.fchmod(fd, MODE)
    finally:
        os.close(fd)


def make_sqlite_private(path: str | os.PathLike[str]) -> None:
    """An SQLite database file and its -wal/-shm/-journal files (those that exist) are 0600.
    SQLite gives the files it creates the database file's mode."""
    make_private(path)
    for suffix in ("-wal", "-shm", "-journal"):
        side = Path(f"{os.fspath(path)}{suffix}")
        if side.exists():
            os.chmod(side, MODE)
