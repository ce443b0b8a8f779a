"""TCP and QUIC transports over real sockets on 127.0.0.1 (no mocks).

The server runs an echo session (each frame answered with the same header and the payload
reversed); the client collects what comes back. QUIC delivers server→client frames in any
order, so replies are matched by request_id.
"""

from __future__ import annotations

import asyncio
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.native import within

from kalandra_core.proto import (
    HEADER_SIZE,
    Frame,
    FrameHeader,
    FrameTruncated,
    InvalidMagic,
    Opcode,
    ProtocolError,
)
from kalandra_core.server.tls import load_or_create, self_signed_certificate
from kalandra_core.transport.interface import FrameSink, Listener, SessionFactory
from kalandra_core.transport.quic import connect_quic, serve_quic
from kalandra_core.transport.tcp import connect_tcp, serve_tcp

HOST = "127.0.0.1"
CLOSE_ME = 0xFFFF_FFFF  # request_id: the echo session replies, then closes the connection
BURST = 0xFFFF_FFFE  # request_id: the echo session floods the client (flow-control test)
BURST_FRAME = 64 * 1024
BURST_LIMIT = 256 * 1024


def make_frame(request_id: int, size: int) -> bytes:
    payload = random.Random(request_id).randbytes(size)
    return Frame.new(FrameHeader(Opcode.APP_MESSAGE, request_id=request_id), payload).encode()


class Recorder:
    """A Session that records everything; subclasses react to frames."""

    def __init__(self, sink: FrameSink) -> None:
        self.sink = sink
        self.frames: list[Frame] = []
        self.errors: list[ProtocolError] = []
        self.lost: list[str] = []
        self.loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self._want = 0
        self._enough: asyncio.Future[None] | None = None

    def frame_received(self, frame: Frame) -> None:
        self.frames.append(frame)
        enough = self._enough
        if enough is not None and len(self.frames) >= self._want and not enough.done():
            enough.set_result(None)

    def protocol_error(self, error: ProtocolError) -> None:
        self.errors.append(error)

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)
        if not self.gone.done():
            self.gone.set_result(None)

    async def wait_frames(self, count: int) -> None:
        self._want = count
        self._enough = self.loop.create_future()
        if len(self.frames) >= count:
            return
        await within(self._enough)


class Echo(Recorder):
    def __init__(self, sink: FrameSink) -> None:
        super().__init__(sink)
        self.burst: list[bool] = []
        self.buffered_at_refusal = -1

    def frame_received(self, frame: Frame) -> None:
        super().frame_received(frame)
        rid = frame.header.request_id
        if rid == BURST:
            self._burst()
            return
        reply = Frame.new(frame.header.copy(), frame.payload[::-1]).encode()
        assert self.sink.send(reply)
        if rid == CLOSE_ME:
            self.sink.close("done")

    def _burst(self) -> None:
        # One synchronous burst: the client cannot read in between, so queues must fill up.
        for i in range(1000):
            ok = self.sink.send(make_frame(i, BURST_FRAME))
            self.burst.append(ok)
            if not ok:
                self.buffered_at_refusal = self.sink.buffered
                return


@dataclass
class Transport:
    name: str
    serve: Callable[..., Awaitable[Listener]]
    connect: Callable[..., Awaitable[FrameSink]]


@pytest.fixture(scope="module")
def cert() -> tuple[bytes, bytes]:
    return self_signed_certificate(["localhost", "127.0.0.1"])


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest, cert: tuple[bytes, bytes]) -> Transport:
    if request.param == "tcp":

        async def tcp_serve(factory: SessionFactory, **kw: Any) -> Listener:
            return await serve_tcp(HOST, 0, factory, **kw)

        async def tcp_connect(port: int, factory: SessionFactory, **kw: Any) -> FrameSink:
            return await connect_tcp(HOST, port, factory, **kw)

        return Transport("tcp", tcp_serve, tcp_connect)

    certificate, key = cert

    async def quic_serve(factory: SessionFactory, **kw: Any) -> Listener:
        return await serve_quic(HOST, 0, factory, certificate=certificate, private_key=key, **kw)

    async def quic_connect(port: int, factory: SessionFactory, **kw: Any) -> FrameSink:
        kw.setdefault("ca_certificate", certificate)
        return await connect_quic(HOST, port, factory, server_name="localhost", **kw)

    return Transport("quic", quic_serve, quic_connect)


@dataclass
class Pair:
    listener: Listener
    servers: list[Echo]
    client: Recorder
    sink: FrameSink

    async def server(self) -> Echo:
        """The server-side session (QUIC creates it when the handshake completes)."""
        for _ in range(200):
            if self.servers:
                return self.servers[0]
            await asyncio.sleep(0.01)
        raise AssertionError("no server session")


@pytest.fixture
async def pair_factory(transport: Transport) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    listeners: list[Listener] = []
    clients: list[Recorder] = []

    async def make(server_kw: dict[str, Any] | None = None) -> Pair:
        servers: list[Echo] = []
        before = len(clients)

        def server_factory(sink: FrameSink) -> Echo:
            s = Echo(sink)
            servers.append(s)
            return s

        def client_factory(sink: FrameSink) -> Recorder:
            c = Recorder(sink)
            clients.append(c)
            return c

        listener = await within(transport.serve(server_factory, **(server_kw or {})))
        listeners.append(listener)
        sink = await within(transport.connect(listener.port, client_factory))
        assert len(clients) == before + 1
        return Pair(listener, servers, clients[-1], sink)

    yield make
    for client in clients:  # so that no client socket outlives the test
        client.sink.close()
        await within(client.gone)
    for listener in listeners:
        listener.close()
        await within(listener.wait_closed())


SIZES = [0, 1, 127, 128, 1000, 1199, 1200, 4096, 65535, 65536 + 7, 300_000, 1024 * 1024]


async def test_roundtrip_assorted_sizes(pair_factory: Callable[..., Awaitable[Pair]]) -> None:
    pair = await pair_factory()
    sizes = SIZES + [random.Random(7).randrange(0, 3000) for _ in range(300)]
    sent = {rid: make_frame(rid, size) for rid, size in enumerate(sizes)}
    for data in sent.values():
        assert pair.sink.send(data)
    await pair.client.wait_frames(len(sent))
    server = await pair.server()

    # Client → server rides one ordered stream on both transports.
    assert [f.encode() for f in server.frames] == list(sent.values())
    replies = {f.header.request_id: f for f in pair.client.frames}
    assert len(replies) == len(sent)
    for rid, data in sent.items():
        original = Frame.decode(data)
        assert replies[rid].header == original.header
        assert replies[rid].payload == original.payload[::-1]
    assert not server.errors
    assert not pair.client.errors
    assert pair.sink.peer.startswith("127.0.0.1:")
    assert server.sink.peer.startswith("127.0.0.1:")


async def test_garbage_header_closes_connection(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    pair = await pair_factory()
    assert pair.sink.send(make_frame(1, 10))
    await pair.client.wait_frames(1)
    assert pair.sink.send(b"\x00" * HEADER_SIZE)
    server = await pair.server()
    await within(server.gone)
    await within(pair.client.gone)
    assert len(server.errors) == 1
    assert isinstance(server.errors[0], InvalidMagic)
    assert len(server.frames) == 1
    assert server.lost == [f"protocol error: {server.errors[0]}"]
    assert len(pair.client.lost) == 1


async def test_eof_mid_frame_is_truncation(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    pair = await pair_factory()
    data = make_frame(1, 1000)
    assert pair.sink.send(data[:600])
    server = await pair.server()
    pair.sink.close("bye")
    await within(server.gone)
    await within(pair.client.gone)
    assert len(server.errors) == 1
    assert isinstance(server.errors[0], FrameTruncated)
    assert len(server.lost) == 1
    assert pair.client.lost == ["bye"]


@pytest.mark.parametrize("side", ["client", "server"])
async def test_close_reports_once_on_both_sides(
    pair_factory: Callable[..., Awaitable[Pair]], side: str
) -> None:
    pair = await pair_factory()
    assert pair.sink.send(make_frame(1, 10))
    await pair.client.wait_frames(1)
    server = await pair.server()
    closer = pair.sink if side == "client" else server.sink
    closer.close("test close")
    closer.close("again")  # idempotent
    await within(server.gone)
    await within(pair.client.gone)
    await asyncio.sleep(0.05)  # room for a duplicate callback to show up
    assert len(server.lost) == 1
    assert len(pair.client.lost) == 1
    local = pair.client if side == "client" else server
    assert local.lost == ["test close"]
    assert not pair.sink.send(make_frame(2, 10))
    assert not server.sink.send(make_frame(2, 10))
    assert not server.errors
    assert not pair.client.errors


async def test_close_flushes_queued_frames(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    pair = await pair_factory()
    sizes = [50_000] * 20
    for rid, size in enumerate(sizes):
        assert pair.sink.send(make_frame(rid, size))
    # The server answers this one, then closes at once: every reply must still arrive.
    assert pair.sink.send(make_frame(CLOSE_ME, 200_000))
    await within(pair.client.gone)
    assert len(pair.client.frames) == len(sizes) + 1
    assert {f.header.request_id for f in pair.client.frames} == {*range(len(sizes)), CLOSE_ME}


async def test_send_refused_past_max_buffered(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    pair = await pair_factory({"max_buffered": BURST_LIMIT})
    assert pair.sink.send(make_frame(BURST, 0))
    server = await pair.server()
    for _ in range(500):
        if server.burst:
            break
        await asyncio.sleep(0.01)
    assert server.burst, "burst never ran"
    assert server.burst[-1] is False, "send never refused"
    accepted = server.burst.count(True)
    assert server.burst == [True] * accepted + [False]
    assert BURST_LIMIT - BURST_FRAME < server.buffered_at_refusal <= BURST_LIMIT
    # Accepted frames are delivered; the refused one is dropped.
    await pair.client.wait_frames(accepted)
    await asyncio.sleep(0.1)
    assert sorted(f.header.request_id for f in pair.client.frames) == list(range(accepted))
    for f in pair.client.frames:
        assert f.encode() == make_frame(f.header.request_id, BURST_FRAME)


async def test_oversized_frame_goes_out_on_idle_connection(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    # An empty queue takes one frame even when it is larger than max_buffered.
    pair = await pair_factory({"max_buffered": 1024})
    assert pair.sink.send(make_frame(5, 100_000))
    await pair.client.wait_frames(1)
    assert pair.client.frames[0].header.request_id == 5


async def test_listener_close_ends_connections(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    pair = await pair_factory()
    assert pair.sink.send(make_frame(1, 10))
    await pair.client.wait_frames(1)
    server = await pair.server()
    pair.listener.close()
    await within(pair.listener.wait_closed())
    await within(server.gone)
    await within(pair.client.gone)
    assert server.lost == ["server shutting down"]
    assert len(pair.client.lost) == 1


# QUIC only


async def _quic_server(cert: tuple[bytes, bytes]) -> tuple[Listener, list[Recorder]]:
    servers: list[Recorder] = []

    def factory(sink: FrameSink) -> Recorder:
        s = Echo(sink)
        servers.append(s)
        return s

    listener = await within(serve_quic(HOST, 0, factory, certificate=cert[0], private_key=cert[1]))
    return listener, servers


@pytest.fixture
async def quic_server(cert: tuple[bytes, bytes]) -> AsyncIterator[tuple[Listener, list[Recorder]]]:
    listener, servers = await _quic_server(cert)
    yield listener, servers
    listener.close()
    await within(listener.wait_closed())


async def test_quic_alpn_mismatch_fails(
    quic_server: tuple[Listener, list[Recorder]], cert: tuple[bytes, bytes]
) -> None:
    listener, servers = quic_server
    with pytest.raises(ConnectionError):
        await within(
            connect_quic(HOST, listener.port, Recorder, ca_certificate=cert[0], alpn="other")
        )
    assert not servers


@pytest.mark.parametrize(
    ("kw", "ok"),
    [
        pytest.param({"ca_certificate": "cert"}, True, id="trusted-ca"),
        pytest.param({"verify": False}, True, id="no-verify"),
        pytest.param({}, False, id="untrusted"),
        pytest.param({"ca_certificate": "cert", "server_name": "other.example"}, False, id="name"),
    ],
)
async def test_quic_certificate_verification(
    quic_server: tuple[Listener, list[Recorder]],
    cert: tuple[bytes, bytes],
    kw: dict[str, Any],
    ok: bool,
) -> None:
    listener, _ = quic_server
    kw = {k: cert[0] if v == "cert" else v for k, v in kw.items()}
    clients: list[Recorder] = []

    def factory(sink: FrameSink) -> Recorder:
        c = Recorder(sink)
        clients.append(c)
        return c

    if not ok:
        with pytest.raises(ConnectionError):
            await within(connect_quic(HOST, listener.port, factory, **kw))
        assert not clients
        return
    sink = await within(connect_quic(HOST, listener.port, factory, **kw))
    assert sink.send(make_frame(3, 100))
    await clients[0].wait_frames(1)
    sink.close()
    await within(clients[0].gone)


def test_tls_load_or_create(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cert, key = load_or_create(cert_path, key_path, ["example.test", "::1"])
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in key
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create(cert_path, key_path, ["ignored"]) == (cert, key)
