"""One member cannot fill the server's disk with media blocks: past
``server.media.quota_per_member`` a CASPut is refused with QUOTA_EXCEEDED naming the limit,
and nothing of the block is stored. Usage counts each block a member references in full, once
per room: putting a block again in the same room is free, a block someone else stored counts
for each holder, and deleting frees the bytes at once. Both engines, raw frames over TCP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import NoReturn

import pytest

from kalandra_core.media.blob import block_hash
from kalandra_core.proto import ErrorCode, Opcode
from kalandra_core.proto.payloads import CasBlock, CasHashes, decode_payload
from kalandra_core.server.app import start_server
from kalandra_core.server.config import MediaConfig
from kalandra_core.storage import StoreError
from security.conftest import server_config
from security.hostile import Account, Raw, error_of, raw, rows
from security.test_frames_hostile import close, make_scene

BLOCK = 3000
QUOTA = 3 * BLOCK + 1000  # three blocks fit, a fourth does not


async def put(conn: Raw, who: Account, room: int, data: bytes) -> int:
    """The answer to a CASPut: 0 when stored, else the Error code."""
    block = CasBlock(hash=block_hash(data), data=data, blob_size=len(data))
    rid = conn.send(Opcode.CAS_PUT, block, account=who, room=room)
    frame = await conn.reply(rid)
    return 0 if frame.header.opcode == Opcode.CAS_PUT else error_of(frame).code


async def test_a_member_cannot_store_media_beyond_the_quota(tmp_path: Path, db_url: str) -> None:
    config = server_config(tmp_path, database=db_url, media=MediaConfig(quota_per_member=QUOTA))
    server = await start_server(config)
    try:
        s = await make_scene(server)
        alice = await raw(server, hello_as=s.alice)
        bob = await raw(server, hello_as=s.bob)
        first, second, third, fourth = (os.urandom(BLOCK) for _ in range(4))
        for data in (first, second, third):
            assert await put(alice, s.alice, s.room, data) == 0
        assert await put(alice, s.alice, s.room, first) == 0  # held already: free
        before = await rows(db_url)

        block = CasBlock(hash=block_hash(fourth), data=fourth, blob_size=BLOCK)
        rid = alice.send(Opcode.CAS_PUT, block, account=s.alice, room=s.room)
        error = await alice.error(rid)
        assert error.code == ErrorCode.QUOTA_EXCEEDED, error
        assert str(QUOTA) in error.message
        assert await rows(db_url) == before  # nothing of the block
        rid = alice.send(
            Opcode.CAS_PROOF, CasHashes(hashes=[block_hash(fourth)]), account=s.alice, room=s.room
        )
        proof = decode_payload(Opcode.CAS_PROOF, (await alice.reply(rid)).payload)
        assert proof == CasHashes(hashes=[])

        # Another member's quota is his own; the block he stored still counts for Alice.
        assert await put(bob, s.bob, s.room, fourth) == 0
        assert await put(alice, s.alice, s.room, fourth) == ErrorCode.QUOTA_EXCEEDED
        # Deleting frees her bytes at once.
        rid = alice.send(
            Opcode.CAS_DELETE, CasHashes(hashes=[block_hash(first)]), account=s.alice, room=s.room
        )
        assert (await alice.reply(rid)).header.opcode == Opcode.CAS_DELETE
        assert await put(alice, s.alice, s.room, fourth) == 0
        assert await server.store.media_usage(s.alice.member_id) == 3 * BLOCK
        alice.close()
        bob.close()
        await close(s.a, s.b)
    finally:
        await server.close()


async def test_blocks_sent_together_are_each_checked(tmp_path: Path, db_url: str) -> None:
    """Puts that arrive together are stored in one transaction (group commit), yet each is
    held to the quota and its hash on its own, a refused one stores nothing and spoils none of
    the others, and a get sent right behind a put finds the block."""
    config = server_config(tmp_path, database=db_url, media=MediaConfig(quota_per_member=QUOTA))
    server = await start_server(config)
    try:
        s = await make_scene(server)
        alice = await raw(server, hello_as=s.alice)
        data = [os.urandom(BLOCK) for _ in range(5)]
        blocks = [CasBlock(hash=block_hash(d), data=d, blob_size=BLOCK) for d in data]
        tampered = CasBlock(hash=block_hash(data[4]), data=data[3], blob_size=BLOCK)
        sent = [
            (Opcode.CAS_PUT, blocks[0]),
            (Opcode.CAS_PUT, tampered),  # refused: hash
            (Opcode.CAS_PUT, blocks[1]),
            (Opcode.CAS_GET, CasBlock(hash=blocks[1].hash)),  # right behind its put
            (Opcode.CAS_PUT, blocks[2]),
            (Opcode.CAS_PUT, blocks[0]),  # held already: free
            (Opcode.CAS_PUT, blocks[3]),  # a fourth block: over the quota
            (Opcode.CAS_GET, CasBlock(hash=blocks[3].hash)),  # so not there
            (Opcode.CAS_PUT, blocks[4]),  # over the quota too
        ]
        rids = [alice.send(op, p, account=s.alice, room=s.room) for op, p in sent]
        answers = await alice.replies(rids)
        got = [answers[r] for r in rids]
        codes = [
            error_of(f).code if f.header.opcode == Opcode.ERROR else f.header.opcode for f in got
        ]
        assert codes == [
            Opcode.CAS_PUT,
            ErrorCode.INVALID_PAYLOAD,
            Opcode.CAS_PUT,
            Opcode.CAS_GET,
            Opcode.CAS_PUT,
            Opcode.CAS_PUT,
            ErrorCode.QUOTA_EXCEEDED,
            ErrorCode.MESSAGE_NOT_FOUND,
            ErrorCode.QUOTA_EXCEEDED,
        ]
        fetched = decode_payload(Opcode.CAS_GET, got[3].payload)
        assert isinstance(fetched, CasBlock)
        assert fetched.data == data[1]
        assert await server.store.media_usage(s.alice.member_id) == 3 * BLOCK
        held = await server.store.media_present(s.room_id, [b.hash for b in blocks])
        assert held == [b.hash for b in blocks[:3]]
        alice.close()
        await close(s.a, s.b)
    finally:
        await server.close()


async def test_blocks_sent_before_a_disconnect_are_stored(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database failure answers each block of the failed transaction STORAGE_ERROR (the
    client may send them again); blocks a client sent just before hanging up are still
    stored (they were sent: only their answers are lost)."""
    server = await start_server(server_config(tmp_path, database=db_url))
    try:
        s = await make_scene(server)
        alice = await raw(server, hello_as=s.alice)
        data = [os.urandom(BLOCK) for _ in range(6)]
        blocks = [CasBlock(hash=block_hash(d), data=d, blob_size=BLOCK) for d in data]
        store = server.store
        working = store.media_put_many

        async def unavailable(*args: object, **kw: object) -> NoReturn:
            raise StoreError("database error: OperationalError")

        monkeypatch.setattr(store, "media_put_many", unavailable)
        rids = [alice.send(Opcode.CAS_PUT, b, account=s.alice, room=s.room) for b in blocks[:3]]
        answers = await alice.replies(rids)
        assert [error_of(answers[r]).code for r in rids] == [ErrorCode.STORAGE_ERROR] * 3
        monkeypatch.setattr(store, "media_put_many", working)

        session = max(server.hub.by_member[s.alice.member_id], key=lambda x: x.session_id)
        for b in blocks:
            alice.send(Opcode.CAS_PUT, b, account=s.alice, room=s.room)
        alice.close()
        await asyncio.wait_for(session.wait_closed(), 30)
        hashes = [b.hash for b in blocks]
        assert await store.media_present(s.room_id, hashes) == hashes
        await close(s.a, s.b)
    finally:
        await server.close()
