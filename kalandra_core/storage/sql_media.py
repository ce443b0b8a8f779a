"""The media statements of ``SqlStore`` (blocks kept once by digest, per-room references with a
reference count kept in the same transaction as the references change)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as db
from .base import MediaPut, NotFound, OverQuota
from .sql_log import dialect_insert

_blocks = db.media_blocks
_refs = db.media_refs


async def usage(conn: AsyncConnection, uploader: int) -> int:
    # length(data), not the size column (equal): SQLite stores size after the blob, so reading
    # it walks the blob's overflow pages (the whole file), while length() reads the row header.
    used = await conn.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(_blocks.c.data)), 0))
        .select_from(_refs.join(_blocks, _refs.c.digest == _blocks.c.digest))
        .where(_refs.c.uploader_id == uploader)
    )
    return int(used or 0)


async def _check_quota(
    conn: AsyncConnection, room_id: bytes, digest: bytes, size: int, uploader: int, quota: int
) -> None:
    """Refuse a new reference that would take the uploader past ``quota`` (before anything is
    written). The uploader's row is locked first (PostgreSQL), so its concurrent puts (other
    sessions) are counted one after the other; SQLite has one writer anyway."""
    await conn.execute(
        sa.select(db.members.c.member_id)
        .where(db.members.c.member_id == uploader)
        .with_for_update()
    )
    held = await conn.scalar(
        sa.select(sa.literal(1)).where(
            _refs.c.room_id == room_id, _refs.c.digest == digest, _refs.c.uploader_id == uploader
        )
    )
    if held:
        return  # already counted
    used = await usage(conn, uploader)
    if used + size > quota:
        raise OverQuota(used, size, quota)


async def put(
    conn: AsyncConnection,
    room_id: bytes,
    digest: bytes,
    data: bytes,
    uploader: int,
    now: int,
    quota: int | None = None,
) -> bool:
    if quota is not None:
        await _check_quota(conn, room_id, digest, len(data), uploader, quota)
    # A new block goes in with its first reference counted: an UPDATE of the row would write
    # the whole block again (SQLite rewrites a row, blob included).
    block = await conn.execute(
        dialect_insert(conn, _blocks)
        .values(digest=digest, data=data, size=len(data), refcount=1, created_at=now)
        .on_conflict_do_nothing(index_elements=["digest"])
    )
    new = bool(block.rowcount == 1)
    ref = await conn.execute(
        dialect_insert(conn, _refs)
        .values(room_id=room_id, digest=digest, uploader_id=uploader, created_at=now)
        .on_conflict_do_nothing(index_elements=["room_id", "digest", "uploader_id"])
    )
    if ref.rowcount == 1 and not new:  # stored already, for another room or uploader
        await conn.execute(
            _blocks.update()
            .where(_blocks.c.digest == digest)
            .values(refcount=_blocks.c.refcount + 1)
        )
    return new


async def get(conn: AsyncConnection, room_id: bytes, digest: bytes) -> bytes | None:
    data = await conn.scalar(
        sa.select(_blocks.c.data).where(
            _blocks.c.digest == digest,
            sa.exists().where(_refs.c.room_id == room_id, _refs.c.digest == digest),
        )
    )
    return None if data is None else bytes(data)


async def get_many(
    conn: AsyncConnection, room_id: bytes, digests: Sequence[bytes]
) -> list[bytes | None]:
    wanted = list(dict.fromkeys(digests))
    if not wanted:
        return [None] * len(digests)
    held = sa.select(_refs.c.digest).where(_refs.c.room_id == room_id, _refs.c.digest.in_(wanted))
    rows = await conn.execute(
        sa.select(_blocks.c.digest, _blocks.c.data).where(_blocks.c.digest.in_(held))
    )
    found = {bytes(r.digest): bytes(r.data) for r in rows}
    return [found.get(d) for d in digests]


async def present(conn: AsyncConnection, room_id: bytes, digests: Sequence[bytes]) -> list[bytes]:
    wanted = list(dict.fromkeys(digests))
    if not wanted:
        return []
    rows = await conn.execute(
        sa.select(_refs.c.digest)
        .where(_refs.c.room_id == room_id, _refs.c.digest.in_(wanted))
        .distinct()
    )
    found = {bytes(r.digest) for r in rows}
    return [d for d in wanted if d in found]


async def release(
    conn: AsyncConnection, room_id: bytes, digests: Sequence[bytes], uploader: int | None
) -> list[bytes]:
    wanted = list(dict.fromkeys(digests))
    if not wanted:
        return []
    where = [_refs.c.room_id == room_id, _refs.c.digest.in_(wanted)]
    if uploader is not None:
        where.append(_refs.c.uploader_id == uploader)
    rows = await conn.execute(_refs.delete().where(*where).returning(_refs.c.digest))
    dropped = Counter(bytes(r.digest) for r in rows)
    for digest, count in dropped.items():
        await conn.execute(
            _blocks.update()
            .where(_blocks.c.digest == digest)
            .values(refcount=_blocks.c.refcount - count)
        )
    if dropped:
        await conn.execute(
            _blocks.delete().where(_blocks.c.digest.in_(list(dropped)), _blocks.c.refcount <= 0)
        )
    return [d for d in wanted if d in dropped]


async def refcount(conn: AsyncConnection, digest: bytes) -> int:
    count = await conn.scalar(sa.select(_blocks.c.refcount).where(_blocks.c.digest == digest))
    return int(count or 0)


async def put_many(
    conn: AsyncConnection, puts: Sequence[MediaPut], now: int, quota: int | None
) -> list[bool | NotFound | OverQuota]:
    """``put`` of each block in one transaction; a refused block is skipped (its result is the
    refusal), so one bad block never aborts the others (PostgreSQL would abort the whole
    transaction on a failed statement: rooms are checked before anything is written)."""
    rooms = {p.room_id for p in puts}
    found = await conn.execute(sa.select(db.rooms.c.room_id).where(db.rooms.c.room_id.in_(rooms)))
    known = {bytes(r.room_id) for r in found}
    used: dict[int, int] = {}
    if quota is not None:
        for uploader in sorted({p.uploader_id for p in puts if p.room_id in known}):
            await conn.execute(  # as in _check_quota: one uploader's puts counted in turn
                sa.select(db.members.c.member_id)
                .where(db.members.c.member_id == uploader)
                .with_for_update()
            )
            used[uploader] = await usage(conn, uploader)
    results: list[bool | NotFound | OverQuota] = []
    for p in puts:
        if p.room_id not in known:
            results.append(NotFound(f"room {p.room_id.hex()}"))
            continue
        size, held = len(p.data), False
        if quota is not None:
            held = await conn.scalar(
                sa.select(sa.literal(1)).where(
                    _refs.c.room_id == p.room_id,
                    _refs.c.digest == p.digest,
                    _refs.c.uploader_id == p.uploader_id,
                )
            )
            if not held and used[p.uploader_id] + size > quota:
                results.append(OverQuota(used[p.uploader_id], size, quota))
                continue
        new = await put(conn, p.room_id, p.digest, p.data, p.uploader_id, now)
        if quota is not None and not held:
            used[p.uploader_id] += size
        results.append(new)
    return results
