"""The content-addressed block store on the server: CASPut, CASGet, CASProof and CASDelete.

Blocks are opaque ciphertext (see :mod:`kalandra_core.media`); they are not sequenced, so the
session answers them directly, in its arrival order. Only members of the room (not removed,
not banned) may use its blocks; a block is refused when its BLAKE3 hash does not match, when
it is larger than an encrypted 256 KiB block, when the blob it belongs to is declared larger
than ``server.media.max_size``, or when it would take its uploader past
``server.media.quota_per_member`` (see MediaConfig for how usage is counted). Every refusal is
an Error frame echoing the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

from ..media.blob import MAX_BLOCK, block_hash
from ..proto import ErrorCode, Frame, Opcode, PayloadDecodeError
from ..proto.payloads import CasBlock, CasHashes, decode_payload
from ..storage.base import NotFound, OverQuota, Role, Store
from . import replies
from .config import ServerConfig
from .workers import RoomWorker

log = logging.getLogger("kalandra.server.cas")

CAS_OPCODES: Final = frozenset(
    {Opcode.CAS_PUT, Opcode.CAS_GET, Opcode.CAS_PROOF, Opcode.CAS_DELETE}
)
MAX_HASHES: Final = 1024  # per CASProof / CASDelete


class Asker(Protocol):
    """The session a request came from (a :class:`~.session.ServerSession`): its member, and
    where the answer goes."""

    member_id: int

    def send(self, frame: bytes) -> bool: ...

    def reject(self, frame: Frame, code: ErrorCode, message: str, **kw: int | None) -> None: ...


class Rooms(Protocol):
    """What the block store needs of the hub (:class:`~.hub.Hub`): the rooms' workers (whose
    sequencers say who may use a room's blocks), the store, the media limits and the clock."""

    store: Store
    config: ServerConfig
    clock: Callable[[], float]

    async def room(self, room_id: bytes) -> RoomWorker | None: ...


async def handle(hub: Rooms, session: Asker, frame: Frame) -> None:
    h = frame.header
    if h.room_id == 0:
        session.reject(frame, ErrorCode.ROOM_NOT_FOUND, "room_id is zero")
        return
    worker = await hub.room(h.room_id_bytes)
    if worker is None:
        session.reject(frame, ErrorCode.ROOM_NOT_FOUND, f"room not found: {h.room_id:032x}")
        return
    seq = worker.sequencer
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
            await _put(hub, session, frame, payload)
            return
        data = await hub.store.media_get(room_id, payload.hash)
        if data is None:
            session.reject(frame, ErrorCode.MESSAGE_NOT_FOUND, "no such block in this room")
            return
        session.send(replies.answer(h, Opcode.CAS_GET, CasBlock(hash=payload.hash, data=data)))
        return
    assert isinstance(payload, CasHashes)
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


async def _put(hub: Rooms, session: Asker, frame: Frame, put: CasBlock) -> None:
    data = put.data
    max_size = hub.config.media.max_size
    if data is None or not data:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "CASPut needs the block's data")
        return
    if len(data) > MAX_BLOCK:
        session.reject(
            frame,
            ErrorCode.QUOTA_EXCEEDED,
            f"block of {len(data)} bytes; the largest is {MAX_BLOCK} (256 KiB encrypted)",
        )
        return
    if put.blob_size is None:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "CASPut needs blob_size")
        return
    if put.blob_size > max_size:
        session.reject(
            frame,
            ErrorCode.QUOTA_EXCEEDED,
            f"file of {put.blob_size} bytes; this server takes files up to {max_size} bytes",
        )
        return
    if block_hash(data) != put.hash:
        session.reject(frame, ErrorCode.INVALID_PAYLOAD, "block does not match its hash")
        return
    quota = hub.config.media.quota_per_member or None
    try:
        await hub.store.media_put(
            frame.header.room_id_bytes, put.hash, data, session.member_id, quota
        )
    except NotFound:
        session.reject(frame, ErrorCode.ROOM_NOT_FOUND, "room not found")
        return
    except OverQuota as exc:
        session.reject(
            frame,
            ErrorCode.QUOTA_EXCEEDED,
            f"media quota of {exc.quota} bytes per member reached: you hold {exc.used} bytes "
            f"and this block is {exc.size}; delete media to make room",
        )
        return
    session.send(replies.answer(frame.header, Opcode.CAS_PUT, CasBlock(hash=put.hash)))
