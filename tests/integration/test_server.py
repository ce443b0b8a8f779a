"""The homeserver's refusals and directories over a real TCP socket: every rejected frame gets
an Error frame echoing its request id, and nothing it refuses is stored."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers.native import Account, account

from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.mls.keypackage import build_key_package
from kalandra_core.proto import (
    EncryptedMessage,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameHeader,
    Hello,
    HelloReply,
    Opcode,
    ProtocolError,
    RawPayload,
    SyncRequest,
    SyncResponse,
    decode_payload,
    hlc,
    sign_header,
)
from kalandra_core.proto.hello_proof import signed_hello
from kalandra_core.server.app import RunningServer, raise_fd_limit, start_server
from kalandra_core.server.config import Limits, ServerConfig
from kalandra_core.transport.interface import FrameSink
from kalandra_core.transport.tcp import connect_tcp


class Raw:
    """A bare protocol connection: frames out by hand, frames in collected."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.sink: FrameSink | None = None
        self._rid = 100

    # Session contract
    def frame_received(self, frame: Frame) -> None:
        self.frames.put_nowait(frame)

    def protocol_error(self, error: ProtocolError) -> None:
        self.closed.set()

    def connection_lost(self, reason: str) -> None:
        self.closed.set()

    def send(
        self,
        opcode: int,
        payload: bytes | object = b"",
        *,
        account: Account | None = None,
        sender: int | None = None,
        room: int = 0,
        epoch: int = 0,
        context: int = 0,
        sign: bool = True,
        hlc_timestamp: int = 0,
    ) -> int:
        self._rid += 1
        header = FrameHeader(
            opcode,
            request_id=self._rid,
            room_id=room,
            sender_id=sender if sender is not None else (account.member_id if account else 0),
            epoch=epoch,
            context_id=context,
            hlc_timestamp=hlc_timestamp,
        )
        frame = Frame.build(header, payload)  # type: ignore[arg-type]
        if sign and account is not None:
            sign_header(frame.header, account.key)
        assert self.sink is not None
        self.sink.send(frame.encode())
        return self._rid

    async def next(self) -> Frame:
        return await asyncio.wait_for(self.frames.get(), 5.0)

    async def reply(self, request_id: int) -> Frame:
        """The answer to one request (room broadcasts to this member are skipped)."""
        while True:
            frame = await self.next()
            if frame.header.request_id == request_id:
                return frame

    async def error(self, request_id: int) -> ErrorPayload:
        while True:
            frame = await self.next()
            if frame.header.opcode == Opcode.ERROR and frame.header.request_id == request_id:
                payload = decode_payload(Opcode.ERROR, frame.payload)
                assert isinstance(payload, ErrorPayload)
                return payload

    async def hello(self, account: Account) -> HelloReply:
        stamp = hlc.pack(int(time.time() * 1000), 0)
        hello = signed_hello(account.token.encode(), account.key, stamp)
        rid = self.send(Opcode.HELLO, hello, hlc_timestamp=stamp)
        frame = await self.next()
        assert frame.header.request_id == rid
        assert frame.header.opcode == Opcode.HELLO_REPLY, decode_payload(
            frame.header.opcode, frame.payload
        )
        reply = decode_payload(Opcode.HELLO_REPLY, frame.payload)
        assert isinstance(reply, HelloReply)
        return reply


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(
        database=f"sqlite:///{tmp_path / 'k.db'}",
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        limits=Limits(rate_per_second=50, rate_burst=20, max_payload_size=64 * 1024),
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.close()


async def raw(server: RunningServer, *, hello_as: Account | None = None) -> Raw:
    """A raw connection; with ``hello_as``, already authenticated as that account."""
    conn = Raw()
    assert server.tcp_port is not None
    conn.sink = await connect_tcp("127.0.0.1", server.tcp_port, lambda _sink: conn)
    if hello_as is not None:
        await conn.hello(hello_as)
    return conn


async def client(server: RunningServer, who: Account) -> Client:
    assert server.tcp_port is not None
    c = Client(
        ClientCore(who.member_id, bytes(who.key)),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        who.token,
        reconnect=False,
    )
    await c.connect()
    return c


async def test_authentication(server: RunningServer) -> None:
    alice = await account(server, "alice")
    conn = await raw(server)
    rid = conn.send(Opcode.APP_MESSAGE, b"", account=alice, room=1)
    assert (await conn.error(rid)).code == ErrorCode.NOT_AUTHORIZED  # before Hello
    await asyncio.wait_for(conn.closed.wait(), 5)  # refused on its header: the end
    conn = await raw(server)
    rid = conn.send(Opcode.HELLO, Hello(auth_token=b"wrong", signature_key=bytes(32)))
    assert (await conn.error(rid)).code == ErrorCode.NOT_AUTHORIZED
    await asyncio.wait_for(conn.closed.wait(), 5)  # and the connection is closed

    conn = await raw(server)
    reply = await conn.hello(alice)
    assert reply.member_id == alice.member_id
    assert reply.server_key is not None
    # Another device key for the same account is refused (the first one was bound).
    intruder = await raw(server)
    rid = intruder.send(
        Opcode.HELLO, Hello(auth_token=alice.token.encode(), signature_key=os.urandom(32))
    )
    assert (await intruder.error(rid)).code == ErrorCode.NOT_AUTHORIZED
    # A revoked token no longer works.
    await server.store.revoke_tokens(alice.member_id)
    late = await raw(server)
    rid = late.send(Opcode.HELLO, Hello(auth_token=alice.token.encode()))
    assert (await late.error(rid)).code == ErrorCode.NOT_AUTHORIZED


async def test_room_frames_are_checked_before_sequencing(server: RunningServer) -> None:
    alice, bob, eve = [await account(server, n) for n in ("alice", "bob", "eve")]
    a = await client(server, alice)
    b = await client(server, bob)
    await b.publish_key_packages(1)
    room_id = await a.create_room(name="checks")
    await a.invite(room_id, [bob.member_id])
    await asyncio.wait_for(b.joined.get(), 5)
    await b.settle()
    room = int.from_bytes(room_id, "big")
    epoch = a.core.rooms[room_id].epoch
    envelope = a.core.rooms[room_id].keys.encrypt(Content(body="x").encode())

    conn = await raw(server, hello_as=eve)
    cases: list[tuple[dict[str, Any], ErrorCode]] = [
        # (frame kwargs, expected error)
        ({"account": eve, "sender": alice.member_id}, ErrorCode.NOT_AUTHORIZED),  # spoofed sender
        ({"account": eve, "sign": False}, ErrorCode.INVALID_SIGNATURE),
        ({"account": eve}, ErrorCode.NOT_AUTHORIZED),  # not a member
        ({"account": eve, "room": 12345}, ErrorCode.ROOM_NOT_FOUND),
    ]
    for kwargs, code in cases:
        kwargs.setdefault("room", room)
        rid = conn.send(Opcode.APP_MESSAGE, envelope, epoch=epoch, **kwargs)
        assert (await conn.error(rid)).code == code, kwargs

    # Nothing of that reached the log: the next message is index 1 (after the add commit).
    index = await a.send_text(room_id, "first real message")
    assert index == 1
    stored = await server.store.load_frames(room_id, 0, 10)
    assert [f.log_index for f in stored] == [0, 1]
    for c in (a, b):
        await c.close()


async def test_rate_limit_answers_retry_after(server: RunningServer) -> None:
    alice = await account(server, "alice")
    conn = await raw(server, hello_as=alice)
    ids = [conn.send(Opcode.PING) for _ in range(60)]
    errors = []
    for _ in ids:
        frame = await conn.next()
        if frame.header.opcode == Opcode.ERROR:
            payload = decode_payload(Opcode.ERROR, frame.payload)
            assert isinstance(payload, ErrorPayload)
            errors.append(payload)
    assert errors
    assert all(e.code == ErrorCode.RATE_LIMITED and e.retry_after for e in errors)


async def test_oversized_frames_are_refused(server: RunningServer) -> None:
    alice = await account(server, "alice")
    conn = await raw(server, hello_as=alice)
    rid = conn.send(Opcode.APP_MESSAGE, bytes(65 * 1024), account=alice, room=1)
    assert (await conn.error(rid)).code == ErrorCode.QUOTA_EXCEEDED


async def test_key_package_directory(server: RunningServer) -> None:
    alice, bob = [await account(server, n) for n in ("alice", "bob")]
    conn = await raw(server, hello_as=alice)
    # Fetch for a member with none published.
    rid = conn.send(Opcode.KEY_PACKAGE, b"", context=bob.member_id, account=alice)
    assert (await conn.error(rid)).code == ErrorCode.MEMBER_NOT_FOUND
    # Publishing someone else's KeyPackage is refused.
    bobs = build_key_package(bob.member_id, bytes(bob.key))
    rid = conn.send(Opcode.KEY_PACKAGE, RawPayload(bobs.key_package), account=alice)
    assert (await conn.error(rid)).code == ErrorCode.NOT_AUTHORIZED
    rid = conn.send(Opcode.KEY_PACKAGE, RawPayload(b"\x00\x01garbage"), account=alice)
    assert (await conn.error(rid)).code == ErrorCode.INVALID_PAYLOAD
    # Our own: stored, then handed out once.
    mine = build_key_package(alice.member_id, bytes(alice.key))
    conn.send(Opcode.KEY_PACKAGE, RawPayload(mine.key_package), account=alice)
    ack = await conn.next()
    assert (ack.header.opcode, ack.header.context_id) == (Opcode.KEY_PACKAGE, 1)
    conn.send(Opcode.KEY_PACKAGE, b"", context=alice.member_id, account=alice)
    fetched = await conn.next()
    assert fetched.payload == mine.key_package
    rid = conn.send(Opcode.KEY_PACKAGE, b"", context=alice.member_id, account=alice)
    assert (await conn.error(rid)).code == ErrorCode.MEMBER_NOT_FOUND


async def test_sync(server: RunningServer) -> None:
    alice, eve = [await account(server, n) for n in ("alice", "eve")]
    a = await client(server, alice)
    room_id = await a.create_room()
    room = int.from_bytes(room_id, "big")
    conn = await raw(server, hello_as=alice)
    # A room with no frames yet answers an empty response (the reference answered an error).
    rid = conn.send(Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), room=room, account=alice)
    frame = await conn.reply(rid)
    assert (frame.header.opcode, frame.header.request_id) == (Opcode.SYNC_RESPONSE, rid)
    response = decode_payload(Opcode.SYNC_RESPONSE, frame.payload)
    assert isinstance(response, SyncResponse)
    assert (response.frames, response.has_more, response.server_epoch) == ([], False, 0)
    for n in range(5):
        await a.send_text(room_id, f"m{n}")
    rid = conn.send(
        Opcode.SYNC_REQUEST, SyncRequest(from_log_index=1, limit=2), room=room, account=alice
    )
    response = decode_payload(Opcode.SYNC_RESPONSE, (await conn.reply(rid)).payload)
    assert isinstance(response, SyncResponse)
    assert [Frame.decode(f).header.context_id for f in response.frames] == [1, 2]
    assert response.has_more
    # Non-members cannot read the log.
    outsider = await raw(server)
    await outsider.hello(eve)
    rid = outsider.send(Opcode.SYNC_REQUEST, SyncRequest(from_log_index=0), room=room, account=eve)
    assert (await outsider.error(rid)).code == ErrorCode.NOT_AUTHORIZED
    await a.close()


async def test_welcome_needs_a_sequenced_add(server: RunningServer) -> None:
    alice, bob = [await account(server, n) for n in ("alice", "bob")]
    a = await client(server, alice)
    room_id = await a.create_room()
    conn = await raw(server, hello_as=alice)
    rid = conn.send(
        Opcode.WELCOME,
        RawPayload(b"\x00\x01\x00\x03"),
        account=alice,
        room=int.from_bytes(room_id, "big"),
        context=bob.member_id,
        epoch=1,
    )
    assert (await conn.error(rid)).code == ErrorCode.MEMBER_NOT_FOUND
    assert await server.store.pending_welcomes(bob.member_id) == []
    await a.close()


async def test_stale_and_future_epochs_carry_the_current_epoch(server: RunningServer) -> None:
    alice, bob = [await account(server, n) for n in ("alice", "bob")]
    a = await client(server, alice)
    b = await client(server, bob)
    await b.publish_key_packages(1)
    room_id = await a.create_room()
    commit_index = await a.invite(room_id, [bob.member_id])
    conn = await raw(server, hello_as=alice)
    room = int.from_bytes(room_id, "big")
    envelope = EncryptedMessage(
        epoch=0, sender_index=0, generation=0, nonce=bytes(24), ciphertext=bytes(17)
    )
    rid = conn.send(Opcode.APP_MESSAGE, envelope, account=alice, room=room, epoch=0)
    stale = await conn.error(rid)
    assert (stale.code, stale.current_epoch, stale.log_index) == (
        ErrorCode.STALE_EPOCH,
        1,
        commit_index,
    )
    rid = conn.send(Opcode.APP_MESSAGE, envelope, account=alice, room=room, epoch=99)
    future = await conn.error(rid)
    assert (future.code, future.current_epoch) == (ErrorCode.FUTURE_EPOCH, 1)
    # The client itself never sees these: its messages carry its MLS epoch.
    assert await a.send_text(room_id, "fine") == commit_index + 1
    for c in (a, b):
        await c.close()


async def test_group_info_publication_and_fetch(server: RunningServer) -> None:
    from kalandra_core.mls.group import MlsGroup

    alice, eve = [await account(server, n) for n in ("alice", "eve")]
    a = await client(server, alice)
    room_id = await a.create_room()
    room = int.from_bytes(room_id, "big")
    conn = await raw(server, hello_as=alice)
    rid = conn.send(Opcode.GROUP_INFO, b"", account=alice, room=room)
    reply = await conn.reply(rid)
    assert reply.header.opcode == Opcode.GROUP_INFO
    # What comes back is a GroupInfo an external joiner can use.
    group, _ = MlsGroup.external_join(reply.payload, 99, os.urandom(32))
    assert group.epoch == 1
    # A newer one replaces it; a stale one is refused with the current epoch.
    await a.self_update(room_id)
    fresh = a.core.rooms[room_id].group.group_info()
    rid = conn.send(Opcode.GROUP_INFO, RawPayload(fresh), account=alice, room=room, epoch=1)
    assert (await conn.reply(rid)).header.opcode == Opcode.GROUP_INFO
    rid = conn.send(Opcode.GROUP_INFO, RawPayload(reply.payload), account=alice, room=room)
    assert (await conn.error(rid)).code == ErrorCode.INVALID_EPOCH
    outsider = await raw(server)
    await outsider.hello(eve)
    rid = outsider.send(Opcode.GROUP_INFO, b"", account=eve, room=room)
    assert (await outsider.error(rid)).code == ErrorCode.NOT_AUTHORIZED
    await a.close()


async def test_an_idle_session_holds_no_task(server: RunningServer) -> None:
    alice = await account(server, "alice")
    conn = await raw(server, hello_as=alice)
    (session,) = server.hub.by_member[alice.member_id]

    async def no_task() -> None:
        async with asyncio.timeout(5):
            while True:  # the Hello's batch ends just after its reply went out
                if session._task is None:
                    return
                await asyncio.sleep(0.01)

    await no_task()
    rid = conn.send(Opcode.PING)
    assert (await conn.reply(rid)).header.opcode == Opcode.PONG
    await no_task()  # woken for the Ping, gone again after it


async def test_pipelined_frames_keep_their_order_and_each_bad_one_is_answered(
    tmp_path: Path,
) -> None:
    # More frames than one verify batch, written at once: their signatures are checked a batch
    # ahead, on the pool, and still every frame is judged in order, each forgery refused.
    config = ServerConfig(
        database=f"sqlite:///{tmp_path / 'k.db'}",
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        limits=Limits(rate_per_second=1e6, rate_burst=1_000_000),
    )
    server = await start_server(config)
    try:
        await _pipelined(server)
    finally:
        await server.close()


async def _pipelined(server: RunningServer) -> None:
    alice = await account(server, "alice")
    a = await client(server, alice)
    room_id = await a.create_room(name="order")
    worker = await server.hub.room(room_id)
    assert worker is not None
    epoch = worker.sequencer.epoch
    await a.close()
    conn = await raw(server, hello_as=alice)
    room = int.from_bytes(room_id, "big")
    envelope = EncryptedMessage(
        epoch=epoch, sender_index=0, generation=0, nonce=bytes(24), ciphertext=bytes(17)
    )
    forger = Account(alice.member_id, alice.token)  # same member, another (unbound) key
    sent: list[tuple[int, bool]] = []
    for i in range(400):
        forged = i % 37 == 5
        who = forger if forged else alice
        sent.append(
            (conn.send(Opcode.APP_MESSAGE, envelope, account=who, room=room, epoch=epoch), forged)
        )
    answers: dict[int, Frame] = {}
    while len(answers) < len(sent):
        frame = await conn.next()
        answers.setdefault(frame.header.request_id, frame)
    indexes = []
    for rid, forged in sent:
        frame = answers[rid]
        if forged:
            assert frame.header.opcode == Opcode.ERROR
            error = decode_payload(Opcode.ERROR, frame.payload)
            assert isinstance(error, ErrorPayload)
            assert error.code == ErrorCode.INVALID_SIGNATURE
        else:
            assert frame.header.opcode == Opcode.APP_MESSAGE
            indexes.append(frame.header.context_id)
    assert indexes == sorted(indexes)
    assert len(indexes) == sum(1 for _, forged in sent if not forged)
    stored = await server.store.load_frames(room_id, 0, 1_000)
    assert [f.log_index for f in stored][-len(indexes) :] == indexes


def test_the_server_raises_its_open_file_limit_to_fit_max_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 10_000 + 256
    expected = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1_024, soft), hard))
        assert raise_fd_limit(10_000) == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
