"""Media blocks have a rate budget of their own per session (``limits.media_rate_per_second``
and ``media_rate_burst``), separate from the frame budget of messages: a file of many blocks
moves without spending or waiting on the frame budget, and a flood of blocks past the block
budget is still refused with RATE_LIMITED, storing and sending nothing of the refused blocks,
while the session's messages and other sessions are served. Both engines, raw frames over TCP.
"""

from __future__ import annotations

import os
from pathlib import Path

from kalandra_core.media.blob import block_hash
from kalandra_core.proto import ErrorCode, Frame, Opcode
from kalandra_core.proto.payloads import CasBlock, decode_payload
from kalandra_core.server.app import RunningServer, start_server
from security.conftest import server_config
from security.hostile import Account, Raw, dummy_envelope, error_of, raw, still_serving
from security.test_frames_hostile import Scene, close, make_scene

BLOCK = 3000
COUNT = 40  # blocks of the file: many times the frame burst below


def blocks(count: int) -> list[CasBlock]:
    data = [os.urandom(BLOCK) for _ in range(count)]
    return [CasBlock(hash=block_hash(d), data=d, blob_size=BLOCK * count) for d in data]


async def exchange(conn: Raw, frames: list[Frame]) -> list[Frame]:
    """Send the frames in one write (nothing waits for an answer) and return their answers in
    the order sent."""
    conn.write(b"".join(f.encode() for f in frames))
    answers = await conn.replies([f.header.request_id for f in frames])
    return [answers[f.header.request_id] for f in frames]


async def all_at_once(
    conn: Raw, who: Account, room: int, requests: list[tuple[Opcode, CasBlock]]
) -> list[Frame]:
    return await exchange(conn, [conn.frame(op, p, account=who, room=room) for op, p in requests])


async def messages(s: Scene, conn: Raw, count: int) -> list[Frame]:
    envelope = dummy_envelope(s.epoch)
    frames = [
        conn.frame(Opcode.APP_MESSAGE, envelope, account=s.alice, room=s.room, epoch=s.epoch)
        for _ in range(count)
    ]
    return await exchange(conn, frames)


def limit_sessions(server: RunningServer, **limits: float) -> None:
    """Limits for the sessions opened from now on (each session reads them when it opens)."""
    for name, value in limits.items():
        setattr(server.hub.config.limits, name, value)


async def test_a_file_of_many_blocks_does_not_spend_the_frame_budget(
    tmp_path: Path, db_url: str
) -> None:
    server = await start_server(server_config(tmp_path, database=db_url))
    try:
        s = await make_scene(server)
        # A frame budget far below the file's block count; the block budget at its default.
        limit_sessions(server, rate_per_second=0.2, rate_burst=4)
        alice = await raw(server, hello_as=s.alice)  # the Hello takes one frame of the four
        file = blocks(COUNT)

        puts = await all_at_once(alice, s.alice, s.room, [(Opcode.CAS_PUT, b) for b in file])
        assert [f.header.opcode for f in puts] == [Opcode.CAS_PUT] * COUNT, [
            error_of(f) for f in puts if f.header.opcode == Opcode.ERROR
        ][:1]
        gets = await all_at_once(
            alice, s.alice, s.room, [(Opcode.CAS_GET, CasBlock(hash=b.hash)) for b in file]
        )
        assert [f.header.opcode for f in gets] == [Opcode.CAS_GET] * COUNT
        fetched = [decode_payload(Opcode.CAS_GET, f.payload) for f in gets]
        assert [b.data for b in fetched if isinstance(b, CasBlock)] == [b.data for b in file]

        # The frame budget is untouched: the three frames it has left are messages.
        answers = await messages(s, alice, 3)
        assert [f.header.opcode for f in answers] == [Opcode.APP_MESSAGE] * 3
        alice.close()
        await close(s.a, s.b)
    finally:
        await server.close()


async def test_a_flood_of_blocks_is_refused_past_the_block_budget(
    tmp_path: Path, db_url: str
) -> None:
    burst = 10
    server = await start_server(server_config(tmp_path, database=db_url))
    try:
        s = await make_scene(server)
        # A block every 20 s: the gets below come well within the refusals' retry_after.
        limit_sessions(server, media_rate_per_second=0.05, media_rate_burst=burst)
        alice = await raw(server, hello_as=s.alice)
        file = blocks(COUNT)

        puts = await all_at_once(alice, s.alice, s.room, [(Opcode.CAS_PUT, b) for b in file])
        stored = [b for b, f in zip(file, puts, strict=True) if f.header.opcode == Opcode.CAS_PUT]
        refused = [f for f in puts if f.header.opcode == Opcode.ERROR]
        assert len(stored) + len(refused) == COUNT
        assert burst <= len(stored) <= burst + 1  # the burst, plus what 0.05/s refilled
        for frame in refused:
            error = error_of(frame)
            assert error.code == ErrorCode.RATE_LIMITED, error
            assert error.retry_after is not None
            assert error.retry_after >= 1
            assert "media" in error.message
        # Nothing of a refused block was stored.
        hashes = [b.hash for b in file]
        assert await server.store.media_present(s.room_id, hashes) == [b.hash for b in stored]

        # Gets sent within the retry_after are refused too, and send no block.
        gets = await all_at_once(
            alice, s.alice, s.room, [(Opcode.CAS_GET, CasBlock(hash=b.hash)) for b in stored]
        )
        assert {error_of(f).code for f in gets} == {ErrorCode.RATE_LIMITED}

        # Meanwhile the same session's messages and another member's blocks are served.
        answers = await messages(s, alice, 2)
        assert [f.header.opcode for f in answers] == [Opcode.APP_MESSAGE] * 2
        bob = await raw(server, hello_as=s.bob)
        [other] = blocks(1)
        [answer] = await all_at_once(bob, s.bob, s.room, [(Opcode.CAS_PUT, other)])
        assert answer.header.opcode == Opcode.CAS_PUT
        await still_serving(server)
        alice.close()
        bob.close()
        await close(s.a, s.b)
    finally:
        await server.close()
