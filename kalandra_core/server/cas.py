"""The content-addressed block store on the server: CASPut, CASGet, CASProof and CASDelete.

Blocks are opaque ciphertext (see :mod:`kalandra_core.media`); they are not sequenced, so the
session answers them directly, in its arrival order. Only members of the room (not removed,
not banned) may use its blocks; a block is refused when its BLAKE3 hash does not match, when
it is larger than an encrypted 256 KiB block, when the blob it belongs to is declared larger
than ``server.media.max_size``, or when it would take its uploader past
``server.media.quota_per_member`` (see MediaConfig for how usage is counted). Every refusal is
an Error frame echoing the request id.

Given a :class:`Batch`, a session's CASPuts are checked one by one as they arrive but stored
together (group commit): the puts that arrive while a transaction commits go into the next
one, one transaction in flight per session, each answered once durable. Consecutive CASGets
are read together. Before any other frame (a get included) the session waits for its puts to
be stored (:func:`flush`), so every frame still sees the effects of those before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..media.blob import MAX_BLOCK, block_hash
from ..proto import ErrorCode, Frame, Opcode, PayloadDecodeError
from ..proto.payloads import CasBlock, CasHashes, decode_payload
from ..storage.base import MediaPut, NotFound, OverQuota, Role, Store, StoreError
from . import replies
from .config import ServerConfig
from .room import RoomSequencer

log = logging.getLogger("kalandra.server.cas")

CAS_OPCODES: Final = frozenset(
    {Opcode.CAS_PUT, Opcode.CAS_GET, Opcode.CAS_PROOF, Opcode.CAS_DELETE}
)
MAX_HASHES: Final = 1024  # per CASProof / CASDelete
GROUP_PUTS: Final = 32  # blocks per transaction (8 MiB): bounds what waits in memory
GROUP_GETS: Final = 16  # blocks per read (4 MiB, a client's send window of answers)


class Asker(Protocol):
    """The session a request came from (a :class:`~.session.ServerSession`): its member, and
    where the answer goes."""

    member_id: int

    def send(self, frame: bytes) -> bool: ...

    def reject(self, frame: Frame, code: ErrorCode, message: str, **kw: int | None) -> None: ...


class Rooms(Protocol):
    """What the block store needs of the hub (:class:`~.hub.Hub`): a view of each room (its
    sequencer's roster and bans say who may use its blocks), the store, the media limits and
    the clock."""

    store: Store
    config: ServerConfig
    clock: Callable[[], float]

    async def room_view(self, room_id: bytes) -> RoomSequencer | None: ...


@dataclass(slots=True)
class Batch:
    """CAS requests of one session admitted (every check passed) and not answered yet: puts
    waiting for the next transaction, the transaction under way, or gets; never gets while
    puts wait or commit."""

    puts: list[tuple[Frame, MediaPut]] = field(default_factory=list)
    gets: list[tuple[Frame, bytes]] = field(default_factory=list)
    committing: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self.puts or self.gets or self.committing)


def _commit_next(hub: Rooms, session: Asker, batch: Batch) -> None:
    """Start the transaction of the waiting puts, unless one is under way (when it ends, it
    starts the next with what arrived meanwhile: one commit in flight per session)."""
    if batch.committing is not None or not batch.puts:
        return
    puts, batch.puts = batch.puts, []

    async def commit() -> None:
        try:
            await _answered(session, [f for f, _ in puts], _store(hub, session, puts))
        finally:
            batch.committing = None
            _commit_next(hub, session, batch)

    batch.committing = asyncio.create_task(commit(), name="media-commit")


async def _committed(hub: Rooms, session: Asker, batch: Batch) -> None:
    """Every put of the batch stored and answered."""
    while batch.committing is not None or batch.puts:
        _commit_next(hub, session, batch)
        task = batch.committing
        assert task is not None
        await asyncio.shield(task)  # a cancelled session still lets the transaction finish


async def settle(hub: Rooms, session: Asker, batch: Batch) -> None:
    """The session has handled what it received: the waiting puts go into a transaction (the
    session goes on reading while it commits), the waiting gets are read and answered."""
    _commit_next(hub, session, batch)
    gets, batch.gets = batch.gets, []
    if gets:
        await _answered(session, [f for f, _ in gets], _read(hub, session, gets))


async def flush(hub: Rooms, session: Asker, batch: Batch) -> None:
    """Answer everything of the batch (before a frame that must see its effects)."""
    await _committed(hub, session, batch)
    await settle(hub, session, batch)


async def _answered(session: Asker, frames: list[Frame], work: Awaitable[None]) -> None:
    """Run ``work``, which answers ``frames``; when it fails, answer each with the failure."""
    try:
        await work
    except Exception as exc:
        storage = type(exc) is StoreError  # not a subclass: the database is unavailable
        if not storage:
            log.exception("session: media requests failed")
        for frame in frames:
            if storage:
                session.reject(frame, ErrorCode.STORAGE_ERROR, "storage unavailable; retry")
            else:
                session.reject(frame, ErrorCode.FRAME_REJECTED, "internal error")


async def _read(hub: Rooms, session: Asker, gets: list[tuple[Frame, bytes]]) -> None:
    room_id = gets[0][0].header.room_id_bytes
    if all(f.header.room_id_bytes == room_id for f, _ in gets):
        found = await hub.store.media_get_many(room_id, [d for _, d in gets])
    else:
        found = [await hub.store.media_get(f.header.room_id_bytes, d) for f, d in gets]
    for (frame, digest), data in zip(gets, found, strict=True):
        if data is None:
            session.reject(frame, ErrorCode.MESSAGE_NOT_FOUND, "no such block in this room")
        else:
            block = CasBlock(hash=digest, data=data)
            session.send(replies.answer(frame.header, Opcode.CAS_GET, block))


async def handle(hub: Rooms, session: Asker, frame: Frame, batch: Batch | None = None) -> None:
    """Answer one CAS request; with ``batch``, a put or get that passes its checks waits there
    (see :func:`flush`)."""
    h = frame.header
    if h.room_id == 0:
        session.reject(frame, ErrorCode.ROOM_NOT_FOUND, "room_id is zero")
        return
    seq = await hub.room_view(h.room_id_bytes)
    if seq is None:
        session.reject(frame, ErrorCode.ROOM_NOT_FOUND, f"room not found: {h.room_id:032x}")
        return
    member = seq.members.get(session.member_id)
    if (
        member is None
        or member.role == Role.REMOVED
        or seq.is_banned(session.member_id, int(hub.clock() * 1000))
    ):
        session.reject(frame, ErrorCode.NOT_AUTHORIZED, "not a member of this room")
        return
    try:
        payload = decode_payload(h.opcode, frame.payload)
    except PayloadDecodeError as exc:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, str(exc))
        return
    room_id = h.room_id_bytes
    if isinstance(payload, CasBlock):
        if h.opcode == Opcode.CAS_PUT:
            put = _admit(hub, session, frame, payload)
            if put is None:
                return
            if batch is None:
                await _store(hub, session, [(frame, put)])
                return
            if batch.gets:
                await settle(hub, session, batch)
            batch.puts.append((frame, put))
            if len(batch.puts) >= GROUP_PUTS:  # bounds what waits in memory
                if batch.committing is not None:
                    await asyncio.shield(batch.committing)  # (then these start committing)
                _commit_next(hub, session, batch)
            return
        if batch is not None:
            await _committed(hub, session, batch)
            batch.gets.append((frame, payload.hash))
            if len(batch.gets) >= GROUP_GETS:
                await settle(hub, session, batch)
            return
        data = await hub.store.media_get(room_id, payload.hash)
        if data is None:
            session.reject(frame, ErrorCode.MESSAGE_NOT_FOUND, "no such block in this room")
            return
        session.send(replies.answer(h, Opcode.CAS_GET, CasBlock(hash=payload.hash, data=data)))
        return
    assert isinstance(payload, CasHashes)
    if batch is not None:
        await flush(hub, session, batch)
    if len(payload.hashes) > MAX_HASHES:
        session.reject(frame, ErrorCode.QUOTA_EXCEEDED, f"at most {MAX_HASHES} hashes per request")
        return
    if h.opcode == Opcode.CAS_PROOF:
        held = await hub.store.media_present(room_id, payload.hashes)
        session.send(replies.answer(h, Opcode.CAS_PROOF, CasHashes(hashes=held)))
        return
    # CASDelete: the uploader drops its own references; moderators and owners drop everyone's.
    anyone = member.role >= Role.MODERATOR
    dropped = await hub.store.media_release(
        room_id, payload.hashes, None if anyone else session.member_id
    )
    session.send(replies.answer(h, Opcode.CAS_DELETE, CasHashes(hashes=dropped)))


def _admit(hub: Rooms, session: Asker, frame: Frame, put: CasBlock) -> MediaPut | None:
    """The block of a CASPut that passes every check before storage; else None (answered)."""
    data = put.data
    max_size = hub.config.media.max_size
    if data is None or not data:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "CASPut needs the block's data")
        return None
    if len(data) > MAX_BLOCK:
        session.reject(
            frame,
            ErrorCode.QUOTA_EXCEEDED,
            f"block of {len(data)} bytes; the largest is {MAX_BLOCK} (256 KiB encrypted)",
        )
        return None
    if put.blob_size is None:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "CASPut needs blob_size")
        return None
    if put.blob_size > max_size:
        session.reject(
            frame,
            ErrorCode.QUOTA_EXCEEDED,
            f"file of {put.blob_size} bytes; this server takes files up to {max_size} bytes",
        )
        return None
    if block_hash(data) != put.hash:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "block does not match its hash")
        return None
    return MediaPut(frame.header.room_id_bytes, put.hash, data, session.member_id)


async def _store(hub: Rooms, session: Asker, puts: list[tuple[Frame, MediaPut]]) -> None:
    """Store admitted puts in one transaction and answer each."""
    quota = hub.config.media.quota_per_member or None
    results = await hub.store.media_put_many([p for _, p in puts], quota)
    for (frame, put), result in zip(puts, results, strict=True):
        if isinstance(result, NotFound):
            session.reject(frame, ErrorCode.ROOM_NOT_FOUND, "room not found")
        elif isinstance(result, OverQuota):
            session.reject(
                frame,
                ErrorCode.QUOTA_EXCEEDED,
                f"media quota of {result.quota} bytes per member reached: you hold "
                f"{result.used} bytes and this block is {result.size}; delete media to make room",
            )
        else:
            session.send(replies.answer(frame.header, Opcode.CAS_PUT, CasBlock(hash=put.digest)))
