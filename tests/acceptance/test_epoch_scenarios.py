"""The five epoch scenarios every release must pass (docs/architecture.md, The five epoch
scenarios), end to end.

A real server process, real sockets (TCP, QUIC) and real databases (SQLite, PostgreSQL); the
native ``Client`` over ``ClientCore`` with its state persisted in ``ClientState``.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time

from acceptance.acceptance_harness import (
    Harness,
    assert_dense,
    error_payload,
    failures,
    message_from,
    record_frames,
    shared_room,
)
from helpers.native import next_message, within
from nacl.signing import SigningKey

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
from kalandra_core.proto import (
    EncryptedMessage,
    ErrorCode,
    Frame,
    FrameHeader,
    Opcode,
    decode_payload,
    sign_header,
)

FUTURE_EPOCH = 0x0106
STALE_EPOCH = 0x0105


def forged_message(client: Client, room_id: bytes, epoch: int, body: str) -> bytes:
    """An AppMessage built by hand: a valid envelope from the member's sender keys and its
    signature, but ``epoch`` in the header."""
    room = client.core.rooms[room_id]
    envelope = room.keys.encrypt(Content(body=body).encode())
    header = FrameHeader(
        Opcode.APP_MESSAGE,
        request_id=secrets.randbits(31) | 1,
        room_id=int.from_bytes(room_id, "big"),
        sender_id=client.core.member_id,
        hlc_timestamp=int(time.time() * 1000) << 22,
        epoch=epoch,
    )
    frame = Frame.build(header, envelope)
    sign_header(frame.header, SigningKey(client.core.signing_key))
    return frame.encode()


def epoch_of(client: Client, room_id: bytes) -> int:
    return client.core.rooms[room_id].epoch


def at_epoch(client: Client, room_id: bytes, epoch: int) -> bool:
    return epoch_of(client, room_id) == epoch


async def test_create_and_send(harness: Harness) -> None:
    """1. A creates a room, adds B, sends: the frame carries epoch 1 (not 0); B decrypts."""
    alice, bob = await harness.users("alice", "bob")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    seen_by_b = record_frames(b, Opcode.APP_MESSAGE)
    room = await shared_room(harness, a, (b, bob))
    assert epoch_of(a, room) == 1
    assert epoch_of(b, room) == 1

    index = await within(a.send_text(room, "hi"))
    message = await message_from(b, alice.member_id, "hi")
    assert message.log_index == index

    frame = next(f for f in seen_by_b if f.header.context_id == index)
    assert frame.header.epoch == 1
    envelope = decode_payload(Opcode.APP_MESSAGE, frame.payload)
    assert isinstance(envelope, EncryptedMessage)
    assert envelope.epoch == 1
    assert failures(a) == []
    assert failures(b) == []


async def test_round_trip(harness: Harness) -> None:
    """2. A sends "hi", B replies "hello" while A is away; A comes back (a new Client over the
    state it persisted) and sees "hello" from the log; A sends "thanks", B decrypts it."""
    alice, bob = await harness.users("alice", "bob")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    room = await shared_room(harness, a, (b, bob))

    hi = await within(a.send_text(room, "hi"))
    await message_from(b, alice.member_id, "hi")
    await within(a.wait_for(lambda: a.core.rooms[room].last_seen == hi))
    await within(a.close())

    hello = await within(b.send_text(room, "hello"))
    assert hello == hi + 1

    a2 = harness.client(alice)  # a new Client and core, restored from ClientState
    assert a2.core.rooms[room].last_seen == hi
    assert a2.core.rooms[room].epoch == 1
    await within(a2.connect())
    got = await next_message(a2)
    # The first thing A sees is B's reply from the sync, not a replay of what it had.
    assert (got.sender_id, got.log_index, got.content.body) == (bob.member_id, hello, "hello")

    thanks = await within(a2.send_text(room, "thanks"))
    message = await message_from(b, alice.member_id, "thanks")
    assert message.log_index == thanks == hello + 1
    assert failures(a2) == []
    assert failures(b) == []


async def test_mismatch_rejection(harness: Harness) -> None:
    """3. Messages labelled with a future (99) or stale epoch are rejected with an Error that
    carries the room's epoch; nothing is stored; the room keeps working for everyone."""
    alice, bob = await harness.users("alice", "bob")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    room = await shared_room(harness, a, (b, bob))
    first = await within(a.send_text(room, "before"))
    await message_from(b, alice.member_id, "before")

    raw = await harness.raw(alice, a.core.signing_key)
    data = forged_message(a, room, 99, "from the future")
    reply = await raw.request(data, Opcode.ERROR, Opcode.APP_MESSAGE)
    error = error_payload(reply)
    assert error.code == FUTURE_EPOCH == ErrorCode.FUTURE_EPOCH
    assert error.current_epoch == 1
    assert reply.header.room_id_bytes == room

    # Nothing was stored: the next accepted frame takes the next index; no epoch 99 in the log.
    after = await within(b.send_text(room, "after"))
    assert after == first + 1
    assert (await message_from(a, bob.member_id, "after")).log_index == after
    log = await raw.sync_all(alice.member_id, room)
    assert_dense(log)
    assert all(f.header.epoch != 99 for f in log)
    assert len(log) == after + 1

    # Move the room to epoch 2 (the add commit at index 0 moved it out of epoch 0).
    update = await within(a.self_update(room))
    await within(b.wait_for(functools.partial(at_epoch, b, room, 2)))
    for stale_epoch, moved_at in ((0, 0), (1, update)):
        data = forged_message(a, room, stale_epoch, "from the past")
        error = error_payload(await raw.request(data, Opcode.ERROR, Opcode.APP_MESSAGE))
        assert error.code == STALE_EPOCH == ErrorCode.STALE_EPOCH
        assert error.current_epoch == 2
        assert error.log_index == moved_at

    # Everyone goes on: both directions decrypt, indexes stay dense.
    from_b = await within(b.send_text(room, "still here"))
    assert from_b == update + 1
    await message_from(a, bob.member_id, "still here")
    from_a = await within(a.send_text(room, "me too"))
    await message_from(b, alice.member_id, "me too")
    log = await raw.sync_all(alice.member_id, room)
    assert_dense(log)
    assert len(log) == from_a + 1
    assert [f.header.epoch for f in log if f.header.opcode == Opcode.APP_MESSAGE] == [1, 1, 2, 2]
    assert failures(a) == []
    assert failures(b) == []


async def test_racing_commits(harness: Harness) -> None:
    """4. A and B commit at the same epoch; exactly one wins, the loser is told (StaleEpoch),
    catches up and retries transparently; everyone converges on the same epoch and secrets,
    and the log holds exactly one commit per epoch."""
    alice, bob, carol = await harness.users("alice", "bob", "carol")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    c = await harness.connect(carol)
    room = await shared_room(harness, a, (b, bob), (c, carol))
    assert epoch_of(a, room) == epoch_of(b, room) == 1
    errors_a = record_frames(a, Opcode.ERROR)
    errors_b = record_frames(b, Opcode.ERROR)

    # Both commits are built at epoch 1 and sent before either client reads anything.
    index_a, index_b = await within(asyncio.gather(a.self_update(room), b.self_update(room)))
    assert sorted([index_a, index_b]) == [1, 2]

    # The loser was told: one StaleEpoch, pointing at the winner's commit; its retry came next.
    told = [
        (client, error_payload(f)) for client, seen in ((a, errors_a), (b, errors_b)) for f in seen
    ]
    assert [e.code for _, e in told] == [STALE_EPOCH], told
    loser, stale = told[0]
    assert stale.current_epoch == 2
    assert stale.log_index == 1  # the winner's commit
    assert (index_a if loser is a else index_b) == 2

    for client in (a, b, c):
        await within(client.wait_for(functools.partial(at_epoch, client, room, 3)))
        await within(client.settle())
    groups = [client.core.rooms[room].group for client in (a, b, c)]
    assert len({g.sender_key_secret() for g in groups}) == 1
    assert len({g.export_secret(b"acceptance", b"ctx", 32) for g in groups}) == 1
    assert len({g.epoch_authenticator for g in groups}) == 1

    raw = await harness.raw(carol, c.core.signing_key)
    log = await raw.sync_all(carol.member_id, room)
    assert_dense(log)
    commits = [f for f in log if f.header.opcode == Opcode.COMMIT]
    assert [f.header.epoch for f in commits] == [0, 1, 2]
    assert {commits[1].header.sender_id, commits[2].header.sender_id} == {
        alice.member_id,
        bob.member_id,
    }

    await within(a.send_text(room, "converged"))
    await message_from(b, alice.member_id, "converged")
    await message_from(c, alice.member_id, "converged")
    for client in (a, b, c):
        assert failures(client) == []


async def test_offline_during_commit(harness: Harness) -> None:
    """5. B is offline while A adds C and sends; B comes back, catches up, decrypts everything,
    and B's next message (sent at once, before any catch-up) is accepted and read by A and C
    without B seeing an error."""
    alice, bob, carol = await harness.users("alice", "bob", "carol")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    c = await harness.connect(carol)
    room = await shared_room(harness, a, (b, bob))
    await within(b.close())

    await within(a.invite(room, [carol.member_id]))
    got = await within(c.joined.get())
    assert got == room
    await within(c.settle())
    away = await within(a.send_text(room, "while you were away"))
    await message_from(c, alice.member_id, "while you were away")
    assert epoch_of(a, room) == epoch_of(c, room) == 2

    b2 = harness.client(bob)
    assert epoch_of(b2, room) == 1
    await within(b2.connect())
    back = await within(b2.send_text(room, "I'm back"))  # no settle first: the hard case
    missed = await message_from(b2, alice.member_id, "while you were away")
    assert missed.log_index == away
    assert epoch_of(b2, room) == 2
    assert (await message_from(a, bob.member_id, "I'm back")).log_index == back
    assert (await message_from(c, bob.member_id, "I'm back")).log_index == back
    for client in (a, b2, c):
        assert failures(client) == []
