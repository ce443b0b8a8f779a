"""A kicked member reads nothing more of the room: from the moment its Kick is sequenced the
server refuses its sync (the log, and the commits between epochs), the GroupInfo and the
room's media blocks (get, proof, put) with NOT_AUTHORIZED, in rooms with public handshakes
(before any member commits the MLS Remove) and with private ones (where the server never sees
that commit), and again after a restart of the server. Both engines."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kalandra_core.media.blob import block_hash
from kalandra_core.mls.group import Handshake
from kalandra_core.proto import ErrorCode, Frame, Kick, Opcode, SyncRequest
from kalandra_core.proto.payloads import CasBlock, CasHashes
from kalandra_core.server.app import RunningServer, start_server
from security.conftest import server_config
from security.hostile import (
    Account,
    Raw,
    account,
    client,
    error_of,
    quiesce,
    raw,
    room_int,
    rows,
)


def put_block(conn: Raw, who: Account, room: int, data: bytes) -> tuple[int, bytes]:
    digest = block_hash(data)
    put = CasBlock(hash=digest, data=data, blob_size=len(data))
    return conn.send(Opcode.CAS_PUT, put, account=who, room=room), digest


async def refused_everything(server: RunningServer, bob: Account, room: int, held: bytes) -> None:
    """Bob asks for every read of the room, and one write of a block; each is NOT_AUTHORIZED."""
    conn = await raw(server, hello_as=bob)
    epoch = server.hub.rooms[room.to_bytes(16, "big")].sequencer.epoch
    kw = {"account": bob, "room": room, "epoch": epoch}
    rids = {
        "sync": conn.send(Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), **kw),
        "commits": conn.send(
            Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0, from_epoch=0), **kw
        ),
        "group info": conn.send(Opcode.GROUP_INFO, b"", **kw),
        "get": conn.send(Opcode.CAS_GET, CasBlock(hash=held), **kw),
        "proof": conn.send(Opcode.CAS_PROOF, CasHashes(hashes=[held]), **kw),
        "put": put_block(conn, bob, room, os.urandom(300))[0],
    }
    answers = await conn.replies(list(rids.values()))  # in whatever order they come
    for what, rid in rids.items():
        frame = answers[rid]
        assert frame.header.opcode == Opcode.ERROR, (what, frame.header)  # never the data
        error = error_of(frame)
        assert error.code == ErrorCode.NOT_AUTHORIZED, (what, error)
    conn.close()


async def frames_after_hello(server: RunningServer, who: Account) -> list[Frame]:
    """What the server sends ``who`` unasked after its Hello (pending Welcomes), up to the
    Pong of a Ping sent right after it."""
    conn = await raw(server, hello_as=who)
    rid = conn.send(Opcode.PING)
    unasked = []
    while (frame := await conn.next()).header.request_id != rid:
        unasked.append(frame)
    conn.close()
    return unasked


@pytest.mark.parametrize("handshake", [Handshake.PUBLIC, Handshake.PRIVATE], ids=str)
async def test_a_kicked_member_can_no_longer_read_the_room_or_its_media(
    tmp_path: Path, db_url: str, handshake: Handshake
) -> None:
    config = server_config(tmp_path, database=db_url)
    server = await start_server(config)
    try:
        alice, bob = await account(server, "alice"), await account(server, "bob")
        carol = await account(server, "carol")  # invited while away, kicked before she is back
        a, b = await client(server, alice, handshake), await client(server, bob, handshake)
        c = await client(server, carol, handshake)
        await b.publish_key_packages(1)
        await c.publish_key_packages(1)
        await c.close()
        room_id = await a.create_room(name="kick")
        await a.invite(room_id, [bob.member_id, carol.member_id])
        await asyncio.wait_for(b.joined.get(), 15)
        await b.settle()
        await a.send_text(room_id, "before the kick")
        await quiesce(server, room_id, a, b)
        # Nobody commits the MLS Remove from here on: the kick alone must shut Bob out.
        await a.close()
        await b.close()
        room = room_int(room_id)
        owner = await raw(server, hello_as=alice)
        rid, held = put_block(owner, alice, room, os.urandom(500))
        assert (await owner.reply(rid)).header.opcode == Opcode.CAS_PUT
        epoch = server.hub.rooms[room_id].sequencer.epoch
        for target in (bob, carol):
            kick = Kick(user_id=target.member_id, reason="out", moderator_id=alice.member_id)
            rid = owner.send(Opcode.KICK, kick, account=alice, room=room, epoch=epoch)
            assert (await owner.reply(rid)).header.opcode == Opcode.KICK
        await quiesce(server, room_id)
        before = await rows(db_url)

        await refused_everything(server, bob, room, held)
        # Carol's Welcome waits in the mailbox: it is not handed to her any more.
        assert not await frames_after_hello(server, carol)
        # The owner still reads all of it (the refusals are Bob's, not the room's).
        rid = owner.send(
            Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), account=alice, room=room
        )
        assert (await owner.reply(rid)).header.opcode == Opcode.SYNC_RESPONSE
        owner.close()
        assert await rows(db_url) == before

        await server.close()
        server = await start_server(config)  # the kick is stored with the room
        await server.hub.room(room_id)
        await refused_everything(server, bob, room, held)
        assert not await frames_after_hello(server, carol)
        assert await rows(db_url) == before
    finally:
        await server.close()
