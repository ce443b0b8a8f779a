"""The in-process connection (kalandra_core/transport/loopback.py): ordering, closing, flow
control, and two real clients talking through a real Hub over it."""

from __future__ import annotations

import asyncio

from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.proto import Frame, FrameHeader, Opcode, ProtocolError
from kalandra_core.server.config import ServerConfig
from kalandra_core.server.hub import Hub
from kalandra_core.storage.memory import MemoryStore
from kalandra_core.transport.interface import FrameSink
from kalandra_core.transport.loopback import connect_loopback, loopback_connector


class Recorder:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lost: list[str] = []
        self.errors: list[ProtocolError] = []
        self.sink: FrameSink | None = None

    def factory(self, sink: FrameSink) -> Recorder:
        self.sink = sink
        return self

    def frame_received(self, frame: Frame) -> None:
        self.frames.append(frame)

    def protocol_error(self, error: ProtocolError) -> None:
        self.errors.append(error)

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


def ping(request_id: int) -> bytes:
    return Frame.build(FrameHeader(Opcode.PING, request_id=request_id), b"").encode()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_frames_arrive_later_in_order_both_ways() -> None:
    server, client = Recorder(), Recorder()
    sink = connect_loopback(server.factory, client.factory)
    assert client.sink is sink
    assert server.sink is not None
    for rid in range(1, 101):
        assert sink.send(ping(rid))
    assert server.frames == []  # asynchronous: nothing re-enters the peer during send
    assert sink.buffered == 100 * len(ping(1))
    assert server.sink.send(ping(7))
    await settle()
    assert [f.header.request_id for f in server.frames] == list(range(1, 101))
    assert [f.header.request_id for f in client.frames] == [7]
    assert sink.buffered == 0
    assert "loopback" in sink.peer


async def test_close_flushes_then_loses_both_sides_once() -> None:
    server, client = Recorder(), Recorder()
    sink = connect_loopback(server.factory, client.factory)
    sink.send(ping(1))
    sink.close("bye")
    sink.close("again")
    assert server.sink is not None
    server.sink.close("too")
    assert not sink.send(ping(2))
    await settle()
    assert [f.header.request_id for f in server.frames] == [1]
    assert server.lost == ["bye"]
    assert client.lost == ["bye"]


async def test_flow_control_refuses_past_the_limit() -> None:
    server, client = Recorder(), Recorder()
    size = len(ping(1))
    sink = connect_loopback(server.factory, client.factory, max_buffered=2 * size)
    assert sink.send(ping(1))
    assert sink.send(ping(2))
    assert not sink.send(ping(3))
    await settle()
    assert sink.send(ping(4))


async def test_garbage_is_a_protocol_error_and_closes() -> None:
    server, client = Recorder(), Recorder()
    sink = connect_loopback(server.factory, client.factory)
    sink.send(b"\x00" * 10)
    await settle()
    assert len(server.errors) == 1
    assert server.frames == []
    assert len(server.lost) == 1
    assert len(client.lost) == 1


async def _client(hub: Hub, store: MemoryStore, name: str) -> Client:
    account = await store.create_member(name)
    token = await store.issue_token(account.member_id)
    core = ClientCore(account.member_id, bytes(SigningKey.generate()))
    client = Client(
        core,
        ServerAddress("tcp", "loopback", 1),
        token,
        connector=loopback_connector(hub.session_factory),
        keepalive=None,
        request_timeout=5.0,
    )
    await client.connect()
    return client


async def test_clients_talk_through_a_real_hub() -> None:
    store = MemoryStore()
    hub = Hub(store, ServerConfig(tcp_port=None, quic_port=None), SigningKey.generate())
    hub.start()
    try:
        alice = await _client(hub, store, "alice")
        bob = await _client(hub, store, "bob")
        await bob.publish_key_packages(1)
        room = await alice.create_room(name="loop")
        await alice.invite(room, [bob.core.member_id])
        assert await asyncio.wait_for(bob.joined.get(), 5) == room
        await bob.settle()
        for i in range(5):
            await alice.send_text(room, f"m{i}")
        got = [await asyncio.wait_for(bob.messages.get(), 5) for _ in range(5)]
        assert [m.content.body for m in got] == [f"m{i}" for i in range(5)]
        assert [m.log_index for m in got] == sorted(m.log_index for m in got)
        sessions = len(hub.sessions)
        await bob.close()
        await settle()
        assert len(hub.sessions) == sessions - 1  # the server saw the connection go
        await alice.close()
    finally:
        await hub.stop()
