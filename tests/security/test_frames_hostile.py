"""Hostile frames against a real homeserver over TCP: forged signatures, spoofed senders,
replays, outsiders, banned members, oversized and lying headers, floods.

Every case asserts the Error frame the server answers (its code) AND that the database is
exactly as it was before (every row of every table): a refused frame leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from pathlib import Path

import cbor2

from kalandra_core.client.driver import Client
from kalandra_core.proto import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD_SIZE,
    VERSION,
    ErrorCode,
    FrameHeader,
    GroupInfoData,
    Kick,
    Opcode,
    Payload,
    RawPayload,
    Redact,
    SyncRequest,
    WelcomeData,
)
from kalandra_core.server.app import RunningServer, start_server
from security.conftest import MAX_PAYLOAD, server_config
from security.hostile import (
    Account,
    account,
    client,
    db_path,
    dummy_envelope,
    error_of,
    expect_error,
    header_bytes,
    quiesce,
    raw,
    room_int,
    snapshot,
    still_serving,
)


@dataclass
class Scene:
    server: RunningServer
    path: Path
    alice: Account  # the room's owner
    bob: Account  # a member
    eve: Account  # an account that is in no room
    a: Client
    b: Client
    room_id: bytes

    @property
    def room(self) -> int:
        return room_int(self.room_id)

    @property
    def epoch(self) -> int:
        return self.server.hub.rooms[self.room_id].sequencer.epoch

    async def quiet(self) -> None:
        await quiesce(self.server, self.room_id, self.a, self.b)


async def make_scene(server: RunningServer) -> Scene:
    alice, bob, eve = [await account(server, n) for n in ("alice", "bob", "eve")]
    a, b = await client(server, alice), await client(server, bob)
    await b.publish_key_packages(1)
    room_id = await a.create_room(name="target")
    await a.invite(room_id, [bob.member_id])
    await asyncio.wait_for(b.joined.get(), 15)
    await b.settle()
    await a.send_text(room_id, "hello")
    scene = Scene(server, db_path(server_config_url(server)), alice, bob, eve, a, b, room_id)
    await scene.quiet()
    return scene


def server_config_url(server: RunningServer) -> str:
    return server.hub.config.database


def request_id_of(header: bytes) -> int:
    return FrameHeader.parse(header).request_id


async def close(*clients: Client) -> None:
    for c in clients:
        await c.close()


def flip(data: bytes, byte: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[byte] ^= 1 << bit
    return bytes(out)


async def test_forged_signatures_are_refused_and_not_stored(server: RunningServer) -> None:
    s = await make_scene(server)
    conn = await raw(server, hello_as=s.alice)
    kick = Kick(user_id=s.bob.member_id, reason="forged", moderator_id=s.alice.member_id)
    payloads = {
        Opcode.APP_MESSAGE: dummy_envelope(s.epoch).encode(),
        Opcode.KICK: kick.encode(),
        Opcode.REDACT: Redact(
            message_log_index=1, reason="forged", moderator_id=s.alice.member_id
        ).encode(),
        Opcode.COMMIT: b"\x00\x01" + bytes(40),
        Opcode.WELCOME: WelcomeData(welcome_bytes=b"\x00\x01", epoch=s.epoch).encode(),
        Opcode.GROUP_INFO: b"",
    }
    before = snapshot(s.path)
    for opcode, payload in payloads.items():
        good = conn.frame(opcode, payload, account=s.alice, room=s.room, epoch=s.epoch)
        data = good.encode()
        forgeries = {
            "another key": conn.frame(
                opcode, payload, account=s.alice, room=s.room, epoch=s.epoch, signer=s.eve.key
            ).encode(),
            "a member's key": conn.frame(
                opcode, payload, account=s.alice, room=s.room, epoch=s.epoch, signer=s.bob.key
            ).encode(),
            "unsigned": conn.frame(
                opcode, payload, account=s.alice, room=s.room, epoch=s.epoch, sign=False
            ).encode(),
            "signature bit flipped": flip(data, 64 + 17, 3),
            "last signature bit flipped": flip(data, HEADER_SIZE - 1, 7),
            "signed header bit flipped": flip(data, 5, 6),  # flags
            "hlc changed after signing": flip(data, 55, 0),
            "epoch changed after signing": flip(data, 63, 1),
        }
        for what, forged in forgeries.items():
            conn.write(forged)
            rid = FrameHeader.parse(forged).request_id
            error = await conn.error(rid)
            assert error.code == ErrorCode.INVALID_SIGNATURE, (opcode.name, what, error)
    assert snapshot(s.path) == before
    # The room still works (and the forged Kick did nothing: Bob is still a member).
    index = await s.b.send_text(s.room_id, "still here")
    assert index == s.server.hub.rooms[s.room_id].sequencer.next_log_index - 1
    conn.close()
    await close(s.a, s.b)


async def test_spoofed_senders_are_refused_and_not_stored(server: RunningServer) -> None:
    s = await make_scene(server)
    index = await s.a.send_text(s.room_id, "alice said this")
    await s.quiet()
    (logged,) = await server.store.load_frames(s.room_id, index, 1)
    before = snapshot(s.path)
    # Bob, a member, authenticated as himself, tries to speak as Alice.
    mallory = await raw(server, hello_as=s.bob)
    cases = {
        "bob's signature, alice's id": mallory.frame(
            Opcode.APP_MESSAGE,
            dummy_envelope(s.epoch),
            sender=s.alice.member_id,
            room=s.room,
            epoch=s.epoch,
            signer=s.bob.key,
        ).encode(),
        # Alice's genuine, validly signed frame, captured and sent on Bob's session.
        "alice's own frame, replayed by bob": logged.encode(),
        "the server's sender id 0": mallory.frame(
            Opcode.APP_MESSAGE, dummy_envelope(s.epoch), sender=0, room=s.room, epoch=s.epoch
        ).encode(),
        "a kick in alice's name": mallory.frame(
            Opcode.KICK,
            Kick(user_id=s.bob.member_id, reason="x", moderator_id=s.alice.member_id),
            sender=s.alice.member_id,
            room=s.room,
            epoch=s.epoch,
            signer=s.bob.key,
        ).encode(),
    }
    for what, data in cases.items():
        mallory.write(data)
        error = await mallory.error(FrameHeader.parse(data).request_id)
        assert error.code == ErrorCode.NOT_AUTHORIZED, (what, error)
    # Before Hello, nothing but Hello is taken, whatever the frame claims.
    anonymous = await raw(server)
    anonymous.write(logged.encode())
    await expect_error(anonymous, request_id_of(logged.header), ErrorCode.NOT_AUTHORIZED)
    assert snapshot(s.path) == before
    for conn in (mallory, anonymous):
        conn.close()
    await close(s.a, s.b)


async def test_replays_are_answered_from_the_log_never_numbered_twice(tmp_path: Path) -> None:
    config = server_config(tmp_path)
    server = await start_server(config)
    try:
        s = await make_scene(server)
        other_room = await s.a.create_room(name="elsewhere")
        index = await s.a.send_text(s.room_id, "say it once")
        await s.quiet()
        (logged,) = await server.store.load_frames(s.room_id, index, 1)
        rid = request_id_of(logged.header)
        before = snapshot(s.path)

        conn = await raw(server, hello_as=s.alice)
        # An exact replay, on another session of the same member: the stored frame comes back.
        conn.write(logged.encode())
        assert (await conn.reply(rid)).encode() == logged.encode()
        # context_id is not signed (the sequencer writes it): still the same request.
        header = FrameHeader.parse(logged.header)
        header.context_id = index + 100
        conn.write(header.to_bytes() + (logged.payload or b""))
        assert (await conn.reply(rid)).encode() == logged.encode()
        # The payload is not covered by the frame signature: a same-size substitute under the
        # captured header is still that request, answered with what was stored.
        payload = logged.payload or b""
        conn.write(logged.header + bytes(len(payload)))
        assert (await conn.reply(rid)).encode() == logged.encode()
        assert snapshot(s.path) == before

        # Into another room, or at another epoch: the modified header fails the signature.
        for field_name, value in (("room_id", room_int(other_room)), ("epoch", s.epoch + 1)):
            moved = FrameHeader.parse(logged.header)
            setattr(moved, field_name, value)
            conn.write(moved.to_bytes() + payload)
            await expect_error(conn, rid, ErrorCode.INVALID_SIGNATURE)
        assert snapshot(s.path) == before
        conn.close()
        await close(s.a, s.b)
    finally:
        await server.close()

    # After a restart the server still knows the request (rebuilt from the stored log).
    server = await start_server(config)
    try:
        conn = await raw(server, hello_as=s.alice)
        conn.write(logged.encode())
        assert (await conn.reply(rid)).encode() == logged.encode()
        assert snapshot(s.path) == before
        conn.close()
    finally:
        await server.close()


async def test_outsiders_cannot_touch_a_room(server: RunningServer) -> None:
    s = await make_scene(server)
    eve = await raw(server, hello_as=s.eve)
    e, room, epoch = s.eve, s.room, s.epoch
    frames: list[tuple[Opcode, Payload | bytes, dict[str, int]]] = [
        (Opcode.APP_MESSAGE, dummy_envelope(epoch), {}),
        (Opcode.TYPING, b"", {}),
        (Opcode.COMMIT, RawPayload(b"\x00\x01" + bytes(40)), {}),
        (Opcode.PROPOSAL, RawPayload(b"\x00\x01" + bytes(40)), {}),
        (Opcode.KICK, Kick(user_id=s.bob.member_id, reason="x", moderator_id=e.member_id), {}),
        (Opcode.WELCOME, RawPayload(b"\x00\x01"), {"context": e.member_id}),
        (Opcode.GROUP_INFO, b"", {}),
        (Opcode.GROUP_INFO, GroupInfoData(group_info=b"\x00\x01"), {}),
        (Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), {}),
        (Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0, from_epoch=0), {}),
    ]
    before = snapshot(s.path)
    for opcode, payload, extra in frames:
        rid = eve.send(opcode, payload, account=e, room=room, epoch=epoch, **extra)
        error = await eve.error(rid)
        assert error.code == ErrorCode.NOT_AUTHORIZED, (opcode.name, error)
    # A room that does not exist, and room id 0.
    for bad_room in (room ^ 1, 0):
        rid = eve.send(Opcode.APP_MESSAGE, dummy_envelope(epoch), account=e, room=bad_room)
        await expect_error(eve, rid, ErrorCode.ROOM_NOT_FOUND)
    # Frames only a server sends are not requests.
    for opcode in (Opcode.ERROR, Opcode.HELLO_REPLY, Opcode.SYNC_RESPONSE, Opcode.FED_APPEND):
        rid = eve.send(opcode, b"", account=e, room=room)
        await expect_error(eve, rid, ErrorCode.FRAME_REJECTED)
    assert snapshot(s.path) == before
    eve.close()
    await close(s.a, s.b)


async def test_banned_members_are_refused(server: RunningServer) -> None:
    s = await make_scene(server)
    await s.a.moderate(s.room_id, "ban", s.bob.member_id, "spam")
    await s.b.close()
    # The server proposes Bob's MLS removal and Alice's client commits it: let that finish.
    members = server.hub.rooms[s.room_id].sequencer.members
    await s.a.wait_for(lambda: s.bob.member_id not in members)
    await quiesce(server, s.room_id, s.a)
    before = snapshot(s.path)
    bob = await raw(server, hello_as=s.bob)
    room, epoch = s.room, s.epoch
    cases: list[tuple[Opcode, Payload | bytes, ErrorCode]] = [
        (Opcode.APP_MESSAGE, dummy_envelope(epoch), ErrorCode.BANNED),
        (Opcode.APP_REACTION, b"\xa0", ErrorCode.BANNED),
        (Opcode.TYPING, b"", ErrorCode.BANNED),
        (Opcode.KICK, Kick(user_id=1, reason="x", moderator_id=s.bob.member_id), ErrorCode.BANNED),
        (Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), ErrorCode.NOT_AUTHORIZED),
        (Opcode.GROUP_INFO, b"", ErrorCode.NOT_AUTHORIZED),
    ]
    for opcode, payload, code in cases:
        for at_epoch in {epoch, epoch - 1}:  # the epoch he knew, and the current one
            rid = bob.send(opcode, payload, account=s.bob, room=room, epoch=at_epoch)
            error = await bob.error(rid)
            assert error.code == code, (opcode.name, at_epoch, error)
    assert snapshot(s.path) == before
    bob.close()
    await s.a.close()


async def test_oversized_and_lying_headers(server: RunningServer) -> None:
    s = await make_scene(server)
    before = snapshot(s.path)
    room, epoch = s.room, s.epoch

    # Beyond the protocol's maximum: refused on the header alone, and the stream is dropped.
    for size in (MAX_PAYLOAD_SIZE + 1, 2**32 - 1):
        conn = await raw(server, hello_as=s.alice)
        conn.write(header_bytes(Opcode.APP_MESSAGE, size))
        frame = await conn.next()
        assert frame.header.opcode == Opcode.ERROR
        assert error_of(frame).code == ErrorCode.INVALID_PAYLOAD
        await conn.wait_closed()

    # Within the protocol's maximum but beyond this server's limit: refused, not stored, and
    # the session keeps going.
    conn = await raw(server, hello_as=s.alice)
    big = conn.frame(
        Opcode.APP_MESSAGE, bytes(MAX_PAYLOAD + 1), account=s.alice, room=room, epoch=epoch
    )
    conn.write(big.encode())
    await expect_error(conn, big.header.request_id, ErrorCode.QUOTA_EXCEEDED)
    rid = conn.send(Opcode.PING)
    assert (await conn.reply(rid)).header.opcode == Opcode.PONG

    # A header announcing less than what follows: the rest is read as a header, and framing
    # is lost (the frame before it is judged on its own, here a bad payload).
    good = conn.frame(Opcode.APP_MESSAGE, dummy_envelope(epoch), account=s.alice, room=room)
    lying = FrameHeader.parse(good.encode())
    lying.payload_size = 3
    # What follows the 3 bytes is taken for the next header (with a Ping to make it whole).
    conn.write(lying.to_bytes() + good.payload + conn.frame(Opcode.PING).encode())
    frames = [await conn.next()]
    await conn.wait_closed()
    while not conn.frames.empty():
        frames.append(conn.frames.get_nowait())
    assert all(f.header.opcode == Opcode.ERROR for f in frames)
    codes = {error_of(f).code for f in frames}
    assert ErrorCode.INVALID_PAYLOAD in codes or ErrorCode.INVALID_SIGNATURE in codes

    # A header announcing more than is ever sent: nothing happens until the peer hangs up.
    conn = await raw(server, hello_as=s.alice)
    promise = conn.frame(Opcode.APP_MESSAGE, dummy_envelope(epoch), account=s.alice, room=room)
    truncated = FrameHeader.parse(promise.encode())
    truncated.payload_size = len(promise.payload) + 1000
    conn.write(truncated.to_bytes() + promise.payload)
    conn.close()

    # Truncated headers and bad magic or version, before any Hello.
    for junk in (
        struct.pack(">IB", MAGIC, VERSION),  # 5 bytes, then EOF
        struct.pack(">IB", 0xDEADBEEF, VERSION) + bytes(HEADER_SIZE),
        struct.pack(">IB", MAGIC, 9) + bytes(HEADER_SIZE),
    ):
        conn = await raw(server)
        conn.write(junk)
        if len(junk) < HEADER_SIZE:
            conn.close()
        else:
            assert error_of(await conn.next()).code == ErrorCode.INVALID_PAYLOAD
            await conn.wait_closed()

    await still_serving(server)
    assert snapshot(s.path) == before
    await close(s.a, s.b)


async def test_a_flood_is_rate_limited_and_others_are_served(tmp_path: Path) -> None:
    burst = 10
    server = await start_server(server_config(tmp_path, rate=5.0, burst=burst))
    try:
        s = await make_scene(server)
        next_index = server.hub.rooms[s.room_id].sequencer.next_log_index
        flooder = await raw(server, hello_as=s.alice)
        count = 60
        envelope = dummy_envelope(s.epoch)
        frames = [
            flooder.frame(
                Opcode.APP_MESSAGE, envelope, account=s.alice, room=s.room, epoch=s.epoch
            )
            for _ in range(count)
        ]
        flooder.write(b"".join(f.encode() for f in frames))  # all at once
        answers = list((await flooder.replies([f.header.request_id for f in frames])).values())
        limited = [a for a in answers if a.header.opcode == Opcode.ERROR]
        accepted = [a for a in answers if a.header.opcode == Opcode.APP_MESSAGE]
        assert len(limited) + len(accepted) == count
        assert limited, "the flood was not limited"
        assert len(accepted) <= burst + 5  # the burst, plus what the rate refilled meanwhile
        for frame in limited:
            error = error_of(frame)
            assert error.code == ErrorCode.RATE_LIMITED, error
            assert error.retry_after is not None
            assert error.retry_after >= 1
        # Only what was accepted is stored, numbered without a gap.
        stored = await server.store.load_frames(s.room_id, next_index, 1000)
        flood_indices = [f.log_index for f in stored if f.sender_id == s.alice.member_id]
        assert sorted(a.header.context_id for a in accepted) == flood_indices
        assert flood_indices == list(range(next_index, next_index + len(accepted)))
        # Meanwhile another member's session is served normally.
        index = await s.b.send_text(s.room_id, "not flooding")
        assert index == next_index + len(accepted)
        await still_serving(server)
        flooder.close()
        await close(s.a, s.b)
    finally:
        await server.close()


def bignum_map(field: str, **others: object) -> bytes:
    """A CBOR map whose ``field`` is a 4096-byte bignum (cbor2 decodes it to a Python int)."""
    return cbor2.dumps({**others, field: cbor2.CBORTag(2, b"\xff" * 4096)})


async def test_hostile_payload_values_are_refused_as_invalid(server: RunningServer) -> None:
    """Values that once broke the decoder's error message (a bignum: repr refuses it) are an
    invalid payload, not an internal error that failed the whole batch of the room."""
    s = await make_scene(server)
    before = snapshot(s.path)
    conn = await raw(server)
    rid = conn.send(Opcode.HELLO, bignum_map("version"))
    await expect_error(conn, rid, ErrorCode.INVALID_PAYLOAD)
    conn.close()
    conn = await raw(server, hello_as=s.alice)
    room, epoch, alice = s.room, s.epoch, s.alice.member_id
    cases = [
        (Opcode.APP_MESSAGE, bignum_map("epoch")),
        (Opcode.APP_RECEIPT, bignum_map("timestamp", message_log_index=0, kind="Read")),
        (Opcode.KICK, bignum_map("user_id", reason="", moderator_id=alice)),
        (Opcode.SYNC_REQUEST, bignum_map("from_log_index")),
    ]
    for opcode, payload in cases:
        rid = conn.send(opcode, payload, account=s.alice, room=room, epoch=epoch)
        error = await conn.error(rid)
        assert error.code == ErrorCode.INVALID_PAYLOAD, (opcode.name, error)
    assert snapshot(s.path) == before
    # A hostile frame and a good one in the same write: the good one is still sequenced.
    bad = conn.frame(
        Opcode.APP_MESSAGE, bignum_map("epoch"), account=s.alice, room=room, epoch=epoch
    )
    good = conn.frame(
        Opcode.APP_MESSAGE, dummy_envelope(epoch), account=s.alice, room=room, epoch=epoch
    )
    conn.write(bad.encode() + good.encode())
    answers = await conn.replies([bad.header.request_id, good.header.request_id])
    assert error_of(answers[bad.header.request_id]).code == ErrorCode.INVALID_PAYLOAD
    assert answers[good.header.request_id].header.opcode == Opcode.APP_MESSAGE
    conn.close()
    await close(s.a, s.b)
