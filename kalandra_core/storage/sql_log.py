"""The frame log's statements for :class:`~kalandra_core.storage.sql.SqlStore`: each function
runs inside a transaction the store opened, on either engine.

Conflict detection: :func:`append` claims the index range with a conditional
``UPDATE rooms SET next_log_index = end WHERE room_id = r AND next_log_index = start`` before it
writes anything. On PostgreSQL a second writer blocks on the row lock, re-evaluates the condition
after the first commits and matches nothing; on SQLite the write lock (``BEGIN IMMEDIATE``)
serializes them. Zero rows -> :class:`AppendConflict`, and the transaction rolls back.

On SQLite, ``SqlStore.append`` runs the same statements through ``sqlite_writer`` instead (plain
``sqlite3``, one hop); a change to :func:`append` here goes there too (the store tests cover both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as db
from .base import (
    AppendConflict,
    LogEntry,
    NotFound,
    RoomChanges,
    RoomMember,
    StoredFrame,
    StoreError,
)
from .schema import u64_to_db


def dialect_insert(conn: AsyncConnection, table: sa.Table) -> Any:
    """The dialect's INSERT: both have ``on_conflict_do_*`` with the same API."""
    return pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)


def upsert(conn: AsyncConnection, table: sa.Table, keys: Sequence[str]) -> Any:
    ins = dialect_insert(conn, table)
    values = {c.name: ins.excluded[c.name] for c in table.columns if c.name not in keys}
    return ins.on_conflict_do_update(index_elements=list(keys), set_=values)


def member_row(room_id: bytes, member: RoomMember) -> dict[str, Any]:
    return {
        "room_id": room_id,
        "member_id": member.member_id,
        "role": int(member.role),
        "leaf_index": member.leaf_index,
    }


def check_batch(room_id: bytes, entries: Sequence[LogEntry], changes: RoomChanges) -> int | None:
    """Reject a malformed batch before touching the database; returns the commit's epoch."""
    start = entries[0].log_index if entries else 0
    for offset, entry in enumerate(entries):
        if entry.log_index != start + offset:
            raise AppendConflict(room_id, start + offset, entry.log_index)
    if changes.commit_log_index is None:
        return None
    if not entries or not start <= changes.commit_log_index < start + len(entries):
        raise ValueError("commit_log_index is not in this batch")
    return entries[changes.commit_log_index - start].epoch


async def append(
    conn: AsyncConnection, room_id: bytes, entries: Sequence[LogEntry], changes: RoomChanges
) -> None:
    commit_epoch = check_batch(room_id, entries, changes)
    rooms = db.rooms
    start = entries[0].log_index if entries else 0
    if entries:
        where = sa.and_(rooms.c.room_id == room_id, rooms.c.next_log_index == start)
        claim: dict[str, Any] = {"next_log_index": start + len(entries)}
    else:
        # Changes without frames (a roster change the server learns from a Welcome): the no-op
        # update still locks the room row and proves the room exists.
        where = rooms.c.room_id == room_id
        claim = {"next_log_index": rooms.c.next_log_index}
    if changes.new_epoch is not None:
        claim["epoch"] = changes.new_epoch
    claimed = await conn.execute(rooms.update().where(where).values(claim))
    if claimed.rowcount != 1:
        current = await conn.scalar(
            sa.select(rooms.c.next_log_index).where(rooms.c.room_id == room_id)
        )
        if current is None:
            raise NotFound(f"room {room_id.hex()}")
        raise AppendConflict(room_id, current, start)
    if not entries:
        await _apply_changes(conn, room_id, changes)
        return
    if conn.dialect.name == "postgresql":
        await _insert_frames_pg(conn, room_id, entries)
    else:
        await conn.execute(
            db.frame_log.insert(),
            [
                {
                    "room_id": room_id,
                    "log_index": e.log_index,
                    "opcode": e.opcode,
                    "sender_id": e.sender_id,
                    "epoch": e.epoch,
                    "header": e.header,
                }
                for e in entries
            ],
        )
        await conn.execute(
            db.frame_payloads.insert(),
            [
                {"room_id": room_id, "log_index": e.log_index, "payload": e.payload}
                for e in entries
            ],
        )
    if commit_epoch is not None:
        await conn.execute(
            db.commit_index.insert().values(
                room_id=room_id, epoch=commit_epoch, log_index=changes.commit_log_index
            )
        )
    await _apply_changes(conn, room_id, changes)


# A batch's frames and payloads in one statement of column arrays: one message to the server
# and one prepared statement however many frames, where an executemany per table sent a Bind
# and Execute per row and ran SQLAlchemy's per-row parameter processing on the event loop.
# (The payloads' foreign key is checked at the end of the statement, after the log rows.)
_PG_INSERT_FRAMES = """\
WITH log AS (
  INSERT INTO frame_log (room_id, log_index, opcode, sender_id, epoch, header)
  SELECT $1, t.l, t.o, t.s, t.e, t.h
  FROM unnest($2::bigint[], $3::integer[], $4::bigint[], $5::bigint[], $6::bytea[])
    AS t(l, o, s, e, h)
)
INSERT INTO frame_payloads (room_id, log_index, payload)
SELECT $1, t.l, t.p FROM unnest($2::bigint[], $7::bytea[]) AS t(l, p)"""


async def _insert_frames_pg(
    conn: AsyncConnection, room_id: bytes, entries: Sequence[LogEntry]
) -> None:
    await conn.exec_driver_sql(_PG_INSERT_FRAMES, (room_id, *_columns(entries)))


# A batch of frames alone (no roster or epoch change), as one statement in autocommit: the
# claim of the index range, the frames and their payloads, one round trip where a transaction
# took four (BEGIN, the claim, the inserts, COMMIT). Nothing is inserted unless the claim
# matched; a statement is atomic by itself.
_PG_APPEND_FRAMES = """\
WITH claim AS (
  UPDATE rooms SET next_log_index = $3 WHERE room_id = $1 AND next_log_index = $2
  RETURNING room_id
), log AS (
  INSERT INTO frame_log (room_id, log_index, opcode, sender_id, epoch, header)
  SELECT claim.room_id, t.l, t.o, t.s, t.e, t.h
  FROM claim, unnest($4::bigint[], $5::integer[], $6::bigint[], $7::bigint[], $8::bytea[])
    AS t(l, o, s, e, h)
), payloads AS (
  INSERT INTO frame_payloads (room_id, log_index, payload)
  SELECT claim.room_id, t.l, t.p FROM claim, unnest($4::bigint[], $9::bytea[]) AS t(l, p)
)
SELECT count(*) FROM claim"""


def frames_only(entries: Sequence[LogEntry], changes: RoomChanges) -> bool:
    """A batch :func:`append_frames_pg` can store: frames, and nothing else to change."""
    return bool(entries) and changes == RoomChanges()


async def append_frames_pg(
    conn: AsyncConnection, room_id: bytes, entries: Sequence[LogEntry]
) -> None:
    """:func:`append` of a :func:`frames_only` batch on PostgreSQL, ``conn`` in autocommit."""
    start = entries[0].log_index
    columns = _columns(entries)
    result = await conn.exec_driver_sql(
        _PG_APPEND_FRAMES, (room_id, start, start + len(entries), *columns)
    )
    if result.scalar() == 1:
        return
    current = await conn.scalar(
        sa.select(db.rooms.c.next_log_index).where(db.rooms.c.room_id == room_id)
    )
    if current is None:
        raise NotFound(f"room {room_id.hex()}")
    raise AppendConflict(room_id, current, start)


def _columns(entries: Sequence[LogEntry]) -> tuple[list[Any], ...]:
    """The arrays of a batch's columns, as the statements above take them."""
    try:
        senders = [u64_to_db(e.sender_id) for e in entries]
    except ValueError:  # as U64's bind processor says, through SQLAlchemy
        raise StoreError("database error: ValueError") from None
    return (
        [e.log_index for e in entries],
        [e.opcode for e in entries],
        senders,
        [e.epoch for e in entries],
        [e.header for e in entries],
        [e.payload for e in entries],
    )


async def _apply_changes(conn: AsyncConnection, room_id: bytes, changes: RoomChanges) -> None:
    # Removals and lifts before upserts and bans: a batch may remove and re-add one member.
    members, bans = db.room_members, db.room_bans
    if changes.remove_members:
        await conn.execute(
            members.delete().where(
                members.c.room_id == room_id, members.c.member_id.in_(changes.remove_members)
            )
        )
    if changes.upsert_members:
        await conn.execute(
            upsert(conn, members, ("room_id", "member_id")),
            [member_row(room_id, m) for m in changes.upsert_members],
        )
    if changes.lift_bans:
        await conn.execute(
            bans.delete().where(bans.c.room_id == room_id, bans.c.member_id.in_(changes.lift_bans))
        )
    if changes.set_bans:
        await conn.execute(
            upsert(conn, bans, ("room_id", "member_id")),
            [
                {
                    "room_id": room_id,
                    "member_id": b.member_id,
                    "moderator_id": b.moderator_id,
                    "reason": b.reason,
                    "expires_at": b.expires_at,
                }
                for b in changes.set_bans
            ],
        )


def _frames_query() -> sa.Select[Any]:
    log, payloads = db.frame_log, db.frame_payloads
    # LEFT JOIN: a redacted frame has no payload row and comes back with payload None.
    joined = log.outerjoin(
        payloads,
        sa.and_(payloads.c.room_id == log.c.room_id, payloads.c.log_index == log.c.log_index),
    )
    return sa.select(
        log.c.log_index,
        log.c.opcode,
        log.c.sender_id,
        log.c.epoch,
        log.c.header,
        payloads.c.payload,
    ).select_from(joined)


def _frame(room_id: bytes, row: Any) -> StoredFrame:
    return StoredFrame(
        room_id=room_id,
        log_index=row.log_index,
        opcode=row.opcode,
        sender_id=row.sender_id,
        epoch=row.epoch,
        header=bytes(row.header),
        payload=None if row.payload is None else bytes(row.payload),
    )


async def load_frames(
    conn: AsyncConnection, room_id: bytes, from_index: int, limit: int
) -> list[StoredFrame]:
    if limit <= 0:
        return []
    log = db.frame_log
    query = (
        _frames_query()
        .where(
            log.c.room_id == room_id,
            log.c.log_index >= from_index,
            log.c.log_index < from_index + limit,  # the log is dense: a range, no LIMIT
        )
        .order_by(log.c.log_index)
    )
    return [_frame(room_id, row) for row in await conn.execute(query)]


async def commits_between(
    conn: AsyncConnection, room_id: bytes, from_epoch: int, to_epoch: int
) -> list[StoredFrame]:
    # The commit indexed at epoch e is the one sent in epoch e: it moved the room to e + 1.
    log, index = db.frame_log, db.commit_index
    query = (
        _frames_query()
        .join(
            index,
            sa.and_(index.c.room_id == log.c.room_id, index.c.log_index == log.c.log_index),
        )
        .where(index.c.room_id == room_id, index.c.epoch >= from_epoch, index.c.epoch < to_epoch)
        .order_by(index.c.epoch)
    )
    return [_frame(room_id, row) for row in await conn.execute(query)]


async def redact(conn: AsyncConnection, room_id: bytes, log_index: int) -> bool:
    payloads, log = db.frame_payloads, db.frame_log
    deleted = await conn.execute(
        payloads.delete().where(payloads.c.room_id == room_id, payloads.c.log_index == log_index)
    )
    if deleted.rowcount:
        return True
    found = await conn.scalar(
        sa.select(log.c.log_index).where(log.c.room_id == room_id, log.c.log_index == log_index)
    )
    return found is not None  # redacting twice still finds the frame
