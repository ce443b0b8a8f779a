"""``media_put_many`` on SQLite in one hop: the statements and checks of ``sql_media.put_many``
run on :class:`~.sqlite_writer.SqliteWriter`'s own connection, in one transaction (through
SQLAlchemy and aiosqlite each statement would be a round trip to another thread)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

from .base import MediaPut, NotFound, OverQuota
from .schema import u64_to_db

# length(data) rather than the equal size column: see sql_media.usage.
_USAGE: Final = (
    "SELECT coalesce(sum(length(b.data)), 0) FROM media_refs r JOIN media_blocks b"
    " ON r.digest = b.digest WHERE r.uploader_id = ?"
)
_HELD: Final = "SELECT 1 FROM media_refs WHERE room_id = ? AND digest = ? AND uploader_id = ?"
_INSERT_BLOCK: Final = (
    "INSERT INTO media_blocks (digest, data, size, refcount, created_at) VALUES (?, ?, ?, 1, ?)"
    " ON CONFLICT (digest) DO NOTHING"
)
_INSERT_REF: Final = (
    "INSERT INTO media_refs (room_id, digest, uploader_id, created_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (room_id, digest, uploader_id) DO NOTHING"
)
_COUNT_REF: Final = "UPDATE media_blocks SET refcount = refcount + 1 WHERE digest = ?"


def put_many(
    conn: sqlite3.Connection, puts: Sequence[MediaPut], now: int, quota: int | None
) -> list[bool | NotFound | OverQuota]:
    """The body of the transaction (the caller opened it and ends it)."""
    rooms = list({p.room_id for p in puts})
    marks = ", ".join("?" * len(rooms))
    known = {
        bytes(r[0])
        for r in conn.execute(f"SELECT room_id FROM rooms WHERE room_id IN ({marks})", rooms)
    }
    used: dict[int, int] = {}
    if quota is not None:
        for uploader in {p.uploader_id for p in puts if p.room_id in known}:
            used[uploader] = int(conn.execute(_USAGE, (u64_to_db(uploader),)).fetchone()[0])
    results: list[bool | NotFound | OverQuota] = []
    for p in puts:
        if p.room_id not in known:
            results.append(NotFound(f"room {p.room_id.hex()}"))
            continue
        uploader, size = u64_to_db(p.uploader_id), len(p.data)
        if conn.execute(_HELD, (p.room_id, p.digest, uploader)).fetchone() is not None:
            results.append(False)  # held already: nothing changes, nothing counted
            continue
        if quota is not None:
            if used[p.uploader_id] + size > quota:
                results.append(OverQuota(used[p.uploader_id], size, quota))
                continue
            used[p.uploader_id] += size
        # The block goes in with its first reference counted: an UPDATE would rewrite the row,
        # blob included (only a block stored already, for another room or uploader, takes one).
        new = conn.execute(_INSERT_BLOCK, (p.digest, p.data, size, now)).rowcount == 1
        conn.execute(_INSERT_REF, (p.room_id, p.digest, uploader, now))
        if not new:
            conn.execute(_COUNT_REF, (p.digest,))
        results.append(new)
    return results


def get_many(
    conn: sqlite3.Connection, room_id: bytes, digests: Sequence[bytes]
) -> list[bytes | None]:
    """``sql_media.get_many`` in one statement on a plain connection (blocks come back as
    ``bytes`` straight from SQLite: no conversion of each row)."""
    wanted = list(dict.fromkeys(digests))
    if not wanted:
        return [None] * len(digests)
    marks = ", ".join("?" * len(wanted))
    rows = conn.execute(
        "SELECT digest, data FROM media_blocks WHERE digest IN"
        f" (SELECT digest FROM media_refs WHERE room_id = ? AND digest IN ({marks}))",
        [room_id, *wanted],
    )
    found = {bytes(digest): data for digest, data in rows}
    return [found.get(d) for d in digests]
