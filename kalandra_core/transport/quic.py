"""The QUIC transport (aioquic), laid out as the reference's quinn server (ALPN "kalandra").

* Client → server: frames back to back on a client-initiated bidirectional stream (the client
  opens one; the server accepts frames on any, each with its own decoder). The server never
  writes on it.
* Server → client: every frame on a new server-initiated unidirectional stream (open, write,
  FIN). The client reads each such stream to its end; it must hold exactly one frame.

``buffered`` is the number of bytes written to our outgoing streams that the peer has not
acknowledged yet (the sum of aioquic's per-stream send buffers, which keep data until it is
ACKed). It covers data still waiting for congestion/flow-control credit as well as data in
flight, which is what grows when the peer reads slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicErrorCode
from aioquic.quic.stream import QuicStream
from aioquic.tls import load_pem_private_key, load_pem_x509_certificates

from ..proto import Frame, FrameDecoder, ProtocolError
from .interface import (
    ALPN,
    DEFAULT_MAX_BUFFERED,
    FrameSink,
    Listener,
    Session,
    SessionFactory,
    read_limit_of,
)
from .tcp import may_queue

log = logging.getLogger(__name__)

# How long close() waits for the peer to acknowledge queued frames before closing anyway.
_CLOSE_GRACE = 5.0
_CONNECT_TIMEOUT = 10.0
# Application error code sent with CONNECTION_CLOSE after a framing error.
_PROTOCOL_ERROR_CODE = 0x1
# Prune acknowledged streams from the accounting once this many are tracked (then doubles).
_PRUNE_MIN = 256
# Server→client streams handed to aioquic but not yet sent; the rest wait in our backlog.
_UNSENT_STREAMS = 32


class StreamNotOneFrame(ProtocolError):
    """A server→client unidirectional stream did not carry exactly one frame."""


def _format_peer(addr: NetworkAddress) -> str:
    host = str(addr[0]).removeprefix("::ffff:")  # aioquic clients use v4-mapped addresses
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


class QuicFrameConnection:
    """The FrameSink of one QUIC connection, gluing aioquic events to a Session. (Not the
    aioquic protocol itself: ``QuicConnectionProtocol.close`` clashes with ``FrameSink.close``.)
    """

    def __init__(
        self,
        factory: SessionFactory,
        max_buffered: int,
        *,
        is_client: bool,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self._factory = factory
        self._max_buffered = max_buffered
        self._is_client = is_client
        self._on_data = self._client_stream_data if is_client else self._server_stream_data
        self._accepting = accepting
        self._loop = asyncio.get_running_loop()
        self._proto: _Protocol | None = None
        self._session: Session | None = None
        self._peer = "?"
        # Outgoing streams whose data or FIN is not yet acknowledged.
        self._out: dict[int, QuicStream] = {}
        self._prune_at = _PRUNE_MIN
        # Upper bound of ``buffered``: grows with each send, made exact when near the limit.
        self._queued = 0
        self._backlog: deque[bytes] = deque()  # server: frames not yet handed to aioquic
        self._backlog_bytes = 0
        self._unsent: list[tuple[QuicStream, int]] = []  # streams aioquic has not sent fully
        self._bidi_id: int | None = None  # client: the stream it writes frames on
        self._decoders: dict[int, FrameDecoder] = {}
        self._uni_frames: dict[int, Frame] = {}  # client: the frame a uni stream carried
        self._stopped: set[int] = set()
        self._transmit_handle: asyncio.Handle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._close_sent = False
        self._close_reason = ""
        self._lost = False
        self.termination = ""
        self.done: asyncio.Future[None] = self._loop.create_future()

    def attach(self, proto: _Protocol) -> None:
        self._proto = proto

    # FrameSink

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def buffered(self) -> int:
        self._queued = self._measure()
        return self._queued

    def send(self, frame: bytes) -> bool:
        proto = self._proto
        if proto is None or self._closing:
            return False
        size = len(frame)
        over = not may_queue(self._queued, size, self._max_buffered)
        if over or len(self._out) > self._prune_at:
            self._queued = self._measure()
            self._prune_at = max(_PRUNE_MIN, 2 * len(self._out))
            if not may_queue(self._queued, size, self._max_buffered):
                return False
        self._queued += size
        if self._is_client:
            quic = proto.quic
            if self._bidi_id is None:
                self._bidi_id = quic.get_next_available_stream_id(is_unidirectional=False)
            quic.send_stream_data(self._bidi_id, frame)
            self._out[self._bidi_id] = quic._streams[self._bidi_id]
        else:
            self._backlog.append(frame)
            self._backlog_bytes += size
        self._transmit_soon()
        return True

    def close(self, reason: str = "") -> None:
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason or "closed locally"
        proto = self._proto
        if proto is None or self._lost:
            return
        if self._bidi_id is not None:
            # A clean end of the client's frame stream (the server sees EOF at a boundary).
            proto.quic.send_stream_data(self._bidi_id, b"", end_stream=True)
        if self._drained():
            self._close_now()
        else:
            self._close_timer = self._loop.call_later(_CLOSE_GRACE, self._close_now)
            self._transmit_soon()

    # Sending and accounting

    def _measure(self) -> int:
        total = self._backlog_bytes
        for sid, stream in list(self._out.items()):
            if stream.sender.is_finished:  # all data and the FIN acknowledged
                del self._out[sid]
            else:
                # aioquic keeps written bytes in the send buffer until they are ACKed.
                total += len(stream.sender._buffer)
        return total

    def _drained(self) -> bool:
        """Every frame handed over and acknowledged (close() FINs the client's stream first)."""
        self._queued = self._measure()
        return not self._out and not self._backlog

    def _feed(self) -> bool:
        """Open streams for backlog frames while aioquic holds few unsent ones; True if any.

        aioquic scans every stream with unsent data for each packet it builds, so handing it a
        large burst of one-frame streams at once costs O(streams) per packet. Keeping at most
        ``_UNSENT_STREAMS`` of them there bounds that scan.
        """
        if not self._backlog or self._proto is None:
            return False
        self._unsent = [
            (stream, size) for stream, size in self._unsent if stream.sender.highest_offset < size
        ]
        quic = self._proto.quic
        fed = False
        while self._backlog and len(self._unsent) < _UNSENT_STREAMS:
            frame = self._backlog.popleft()
            self._backlog_bytes -= len(frame)
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, frame, end_stream=True)
            stream = quic._streams[sid]
            # aioquic never marks the (nonexistent) receive half of a local unidirectional
            # stream finished, so it would keep every such stream forever; finish it here.
            stream.receiver.is_finished = True
            self._out[sid] = stream
            self._unsent.append((stream, len(frame)))
            fed = True
        return fed

    def _transmit_soon(self) -> None:
        # One transmit per loop iteration packs a burst of frames into full datagrams.
        if self._transmit_handle is None:
            self._transmit_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_handle = None
        if self._proto is None or self._lost:
            return
        # Feed and send until the backlog is empty or aioquic stops taking data (congestion
        # or flow control); ACKs arriving later resume it from after_receive().
        while True:
            fed = self._feed()
            self._proto.transmit()
            if not fed:
                break

    def _close_now(self, error_code: int = QuicErrorCode.NO_ERROR) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._close_sent or self._proto is None or self._lost:
            return
        self._close_sent = True
        self._proto.close(error_code=error_code, reason_phrase=self._close_reason[:200])

    # Events from aioquic

    def note_peer(self, addr: NetworkAddress) -> None:
        if self._peer == "?":
            self._peer = _format_peer(addr)

    def after_receive(self) -> None:
        """Called after each datagram: ACKs may have opened the window or drained a close."""
        if self._backlog and not self._lost:
            self._transmit()
        if self._closing and not self._close_sent and not self._lost and self._drained():
            self._close_now()

    def handle_event(self, event: events.QuicEvent) -> None:
        try:
            if isinstance(event, events.StreamDataReceived):
                if self._session is not None and not self._closing:
                    self._on_data(event)
            elif isinstance(event, events.HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, events.StreamReset):
                self._decoders.pop(event.stream_id, None)
                self._uni_frames.pop(event.stream_id, None)
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason_phrase or f"connection closed (error 0x{event.error_code:x})"
                self.terminated(reason)
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("session failed on an event from %s; closing", self._peer)
            self.close("internal error")

    def _handshake_completed(self) -> None:
        if self._session is None and self._accepting():
            self._session = self._factory(self)
        elif self._session is None:
            self.close("server shutting down")

    def _server_stream_data(self, event: events.StreamDataReceived) -> None:
        session = self._session
        assert session is not None
        sid = event.stream_id
        if sid % 4 != 0:
            # Only client-initiated bidirectional streams carry frames; refuse the rest once.
            if sid not in self._stopped and not event.end_stream:
                self._stopped.add(sid)
                assert self._proto is not None
                with contextlib.suppress(ValueError):
                    self._proto.quic.stop_stream(sid, QuicErrorCode.NO_ERROR)
            return
        decoder = self._decoders.get(sid)
        if decoder is None:
            # The session's read limit judges each header before its payload is buffered.
            decoder = self._decoders[sid] = FrameDecoder(read_limit_of(session))
        frames = decoder.feed(event.data)
        for frame in frames:
            session.frame_received(frame)
            if self._closing:
                return
        if frames:
            decoder.feed(b"")  # raises an error held back behind the frames just delivered
        if event.end_stream:
            del self._decoders[sid]
            decoder.eof()

    def _client_stream_data(self, event: events.StreamDataReceived) -> None:
        session = self._session
        assert session is not None
        sid = event.stream_id
        if sid % 4 != 3:
            return  # the server never writes on our bidirectional stream; ignore if it does
        decoder = self._decoders.get(sid)
        if decoder is None:
            decoder = self._decoders[sid] = FrameDecoder()
        for frame in decoder.feed(event.data):
            if sid in self._uni_frames:
                raise StreamNotOneFrame(f"stream {sid} carries more than one frame")
            self._uni_frames[sid] = frame
        if not event.end_stream:
            return
        del self._decoders[sid]
        decoder.eof()
        frame_or_none = self._uni_frames.pop(sid, None)
        if frame_or_none is None:
            raise StreamNotOneFrame(f"stream {sid} ended without a frame")
        session.frame_received(frame_or_none)

    def _protocol_error(self, exc: ProtocolError) -> None:
        if self._session is not None and not self._closing:
            try:
                self._session.protocol_error(exc)
            finally:
                self.close(f"protocol error: {exc}")

    def terminated(self, reason: str) -> None:
        """The connection is over (event from aioquic, or a hard shutdown): tell the session."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.termination = reason
        for handle in (self._transmit_handle, self._close_timer):
            if handle is not None:
                handle.cancel()
        self._transmit_handle = self._close_timer = None
        self._out.clear()
        self._backlog.clear()
        self._backlog_bytes = 0
        try:
            if self._is_client and self._proto is not None and self._proto.socket is not None:
                self._proto.socket.close()  # the client's UDP socket is its own
            if self._session is not None:
                self._session.connection_lost(self._close_reason or reason)
        finally:
            if not self.done.done():
                self.done.set_result(None)


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, conn: QuicFrameConnection) -> None:
        super().__init__(quic)
        # The QUIC state machine and the UDP socket this protocol drives, kept here as well:
        # aioquic's protocol has no public reference to either.
        self.quic = quic
        self.socket: asyncio.DatagramTransport | None = None
        self.conn = conn
        conn.attach(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.socket = cast(asyncio.DatagramTransport, transport)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self.conn.handle_event(event)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self.conn.note_peer(addr)
        super().datagram_received(data, addr)
        self.conn.after_receive()


class QuicListener:
    """A QUIC server socket. ``close`` closes every connection gracefully, then the socket."""

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        server: QuicServer,
        connections: set[QuicFrameConnection],
    ) -> None:
        self._transport = transport
        self._server = server
        self._connections = connections
        self._closing = False
        self._shutdown: asyncio.Task[None] | None = None

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def port(self) -> int:
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for conn in list(self._connections):
            conn.close("server shutting down")
        self._shutdown = asyncio.ensure_future(self._finish())

    async def _finish(self) -> None:
        pending = [c.done for c in self._connections if not c.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_GRACE + 1.0)
        # Whatever has not ended by now is cut off; its session still hears about it.
        for conn in list(self._connections):
            conn.terminated("server shut down")
        self._server.close()

    async def wait_closed(self) -> None:
        if self._shutdown is not None:
            await asyncio.shield(self._shutdown)


async def serve_quic(
    host: str,
    port: int,
    factory: SessionFactory,
    *,
    certificate: bytes,
    private_key: bytes,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    idle_timeout: float = 60.0,
) -> Listener:
    """Listen for QUIC on UDP ``host:port`` (0 = ephemeral) with a PEM certificate chain + key."""
    certs = load_pem_x509_certificates(certificate)
    if not certs:
        raise ValueError("no certificate in the PEM data")
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=idle_timeout)
    config.certificate = certs[0]
    config.certificate_chain = certs[1:]
    config.private_key = load_pem_private_key(private_key)

    loop = asyncio.get_running_loop()
    connections: set[QuicFrameConnection] = set()
    listener: QuicListener | None = None

    def accepting() -> bool:
        return listener is None or listener.accepting

    def create_protocol(
        quic: QuicConnection, stream_handler: object = None, **_: object
    ) -> _Protocol:
        conn = QuicFrameConnection(factory, max_buffered, is_client=False, accepting=accepting)
        connections.add(conn)
        conn.done.add_done_callback(lambda _f: connections.discard(conn))
        return _Protocol(quic, conn)

    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=config, create_protocol=create_protocol),
        local_addr=(host, port),
    )
    listener = QuicListener(transport, server, connections)
    return listener


async def connect_quic(
    host: str,
    port: int,
    factory: SessionFactory,
    *,
    server_name: str = "localhost",
    verify: bool = True,
    ca_certificate: bytes | None = None,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    idle_timeout: float = 60.0,
    alpn: str = ALPN,
    handshake_timeout: float = _CONNECT_TIMEOUT,
) -> FrameSink:
    """Connect and finish the handshake (``factory`` runs when it completes).

    ``verify=False`` accepts any certificate; ``ca_certificate`` (PEM) replaces the system
    trust store. Raises ConnectionError when the handshake fails (certificate, ALPN, timeout).
    """
    config = QuicConfiguration(
        is_client=True, alpn_protocols=[alpn], server_name=server_name, idle_timeout=idle_timeout
    )
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    if ca_certificate is not None:
        config.load_verify_locations(cadata=ca_certificate)

    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    local = "::" if family == socket.AF_INET6 else "0.0.0.0"
    conn = QuicFrameConnection(factory, max_buffered, is_client=True)
    _, proto = await loop.create_datagram_endpoint(
        lambda: _Protocol(QuicConnection(configuration=config), conn),
        local_addr=(local, 0),
        family=family,
    )
    conn.note_peer(addr)
    try:
        proto.connect(addr)
        await asyncio.wait_for(proto.wait_connected(), handshake_timeout)
    except BaseException as exc:
        conn.terminated("handshake failed")  # closes the socket
        if proto._timer is not None:
            proto._timer.cancel()
        if not isinstance(exc, ConnectionError | TimeoutError):
            raise
        detail = conn.termination if conn.termination != "handshake failed" else "timed out"
        raise ConnectionError(f"QUIC handshake with {host}:{port} failed: {detail}") from None
    return conn
