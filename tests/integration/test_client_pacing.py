"""The native client under rate limiting and bursts, against a real server on SQLite.

A burst of concurrent sends from one client goes out through the client's send window; the
server's RATE_LIMITED answers pause it rather than fail anything. Every send completes, each
message is stored once, in the order of the send calls, and the other member reads them all in
that order. The same holds when the connection drops in the middle of the burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.proto import ErrorCode, ErrorPayload, Frame, Opcode, decode_payload
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import Limits, ServerConfig

RATE = 50.0  # frames per second and session
BURST = 20
COUNT = 1000


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(
        database=f"sqlite:///{tmp_path / 'k.db'}",
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        limits=Limits(rate_per_second=RATE, rate_burst=BURST),
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.close()


async def _client(server: RunningServer, name: str) -> Client:
    member = await server.store.create_member(name)
    token = await server.store.issue_token(member.member_id)
    assert server.tcp_port is not None
    client = Client(
        ClientCore(member.member_id, bytes(SigningKey.generate())),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        token,
        request_timeout=60.0,
    )
    await client.connect()
    return client


def _count_refusals(client: Client) -> Callable[[], int]:
    """Counts the RATE_LIMITED answers the client gets (a spy on its core's input)."""
    seen = [0]
    receive = client.core.receive

    def spy(frame: Frame, *, now: float) -> list[ev.Event]:
        if frame.header.opcode == Opcode.ERROR:
            error = decode_payload(Opcode.ERROR, frame.payload)
            assert isinstance(error, ErrorPayload)
            if error.code == ErrorCode.RATE_LIMITED:
                assert error.retry_after is not None
                assert error.retry_after >= 1
                seen[0] += 1
        return receive(frame, now=now)

    client.core.receive = spy  # type: ignore[method-assign]
    return lambda: seen[0]


async def _room_with(server: RunningServer) -> tuple[Client, Client, bytes]:
    alice = await _client(server, "alice")
    bob = await _client(server, "bob")
    await bob.publish_key_packages(1)
    room = await alice.create_room("burst")
    await alice.invite(room, [bob.core.member_id])
    assert await asyncio.wait_for(bob.joined.get(), 60) == room
    await bob.settle()
    return alice, bob, room


async def _receive(bob: Client, room: bytes, count: int) -> list[tuple[int, str]]:
    received: list[tuple[int, str]] = []
    while len(received) < count:
        message = await bob.messages.get()
        if message.room_id == room:
            received.append((message.log_index, message.content.body))
    return received


async def _check_log(server: RunningServer, room: bytes, sender: int, indexes: list[int]) -> None:
    """Each message stored exactly once, at the index its send returned."""
    stored = await server.store.load_frames(room, 0, 100_000)
    assert [f.log_index for f in stored] == list(range(len(stored)))  # dense
    messages = [
        f.log_index for f in stored if f.sender_id == sender and f.opcode == Opcode.APP_MESSAGE
    ]
    assert messages == indexes


async def test_a_burst_of_sends_goes_through_the_rate_limit(server: RunningServer) -> None:
    alice, bob, room = await _room_with(server)
    refusals = _count_refusals(alice)
    try:
        bodies = [f"m{i}" for i in range(COUNT)]
        async with asyncio.timeout(600):
            indexes, received = await asyncio.gather(
                asyncio.gather(*(alice.send_text(room, body) for body in bodies)),
                _receive(bob, room, COUNT),
            )
        assert refusals() > 0  # the server did limit the burst
        # In the order of the calls: a self-update of alice's (every 100 messages) moved the
        # epoch meanwhile, and what followed it was encrypted after it, so the order holds.
        assert indexes == sorted(indexes)
        assert len(set(indexes)) == COUNT
        assert received == list(zip(indexes, bodies, strict=True))  # all, in log order
        await _check_log(server, room, alice.core.member_id, indexes)
        assert not alice.core.outbox
    finally:
        await alice.close()
        await bob.close()


async def test_a_connection_lost_in_a_burst_resends_through_the_window(
    server: RunningServer,
) -> None:
    alice, bob, room = await _room_with(server)
    refusals = _count_refusals(alice)
    count = 300
    try:
        bodies = [f"r{i}" for i in range(count)]
        sends = asyncio.gather(*(alice.send_text(room, body) for body in bodies))
        receiving = asyncio.ensure_future(_receive(bob, room, count))
        async with asyncio.timeout(600):
            # Cut the connection once part of the burst is in the log and the rest still waits.
            await alice.wait_for(lambda: 0 < len(alice.core.outbox) < count - BURST)
            sink = alice._sink
            assert sink is not None
            sink.close("cut by the test")
            indexes = await sends
            received = await receiving
        assert refusals() > 0
        assert indexes == sorted(indexes)
        assert len(set(indexes)) == count
        assert received == list(zip(indexes, bodies, strict=True))
        await _check_log(server, room, alice.core.member_id, indexes)
    finally:
        await alice.close()
        await bob.close()
