"""The TCP transport: frames back to back on one byte stream in each direction.

Built on asyncio Protocols rather than streams: ``data_received`` feeds the decoder directly,
with no reader task or extra copy per connection. Frames sent in one turn of the event loop
leave in one write (a sequenced batch fans out as one system call per connection, not one per
frame); they are written at the start of the next turn. ``buffered`` is those frames plus
asyncio's write buffer (``transport.get_write_buffer_size()``): bytes the kernel has not
accepted yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Final

from ..proto import FrameDecoder, ProtocolError
from .interface import (
    DEFAULT_MAX_BUFFERED,
    FrameSink,
    Listener,
    Session,
    SessionFactory,
    read_limit_of,
)

log = logging.getLogger(__name__)

# How long Listener.wait_closed lets connections flush before aborting them.
_CLOSE_GRACE = 5.0


def _format_peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def may_queue(buffered: int, size: int, max_buffered: int) -> bool:
    """The flow-control rule shared by the transports.

    A frame is refused when it would take the queue past ``max_buffered``; an empty queue still
    takes one frame of any size, so a frame larger than the limit (payloads go up to 16 MiB)
    can be sent on an idle connection.
    """
    return buffered == 0 or buffered + size <= max_buffered


READ_SIZE: Final = 1024 * 1024  # bytes asked of each recv (asyncio's default: 256 KiB)


class TcpConnection(asyncio.Protocol):
    """One TCP connection: a FrameSink for the session, an asyncio Protocol for the loop."""

    def __init__(self, factory: SessionFactory, max_buffered: int) -> None:
        self._factory = factory
        self._max_buffered = max_buffered
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._peer = "?"
        self._closing = False
        self._close_reason = ""
        self._lost = False
        self._loop = asyncio.get_running_loop()
        self._corked: list[bytes] = []  # sent this turn of the loop, written by _flush
        self._corked_size = 0
        self.done: asyncio.Future[None] = self._loop.create_future()

    # FrameSink

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def buffered(self) -> int:
        t = self._transport
        return self._corked_size + (t.get_write_buffer_size() if t is not None else 0)

    def send(self, frame: bytes) -> bool:
        t = self._transport
        if t is None or self._closing or t.is_closing():
            return False
        if not may_queue(self.buffered, len(frame), self._max_buffered):
            return False
        if not self._corked:
            self._loop.call_soon(self._flush)
        self._corked.append(frame)
        self._corked_size += len(frame)
        return True

    def _flush(self) -> None:
        frames = self._corked
        if not frames:
            return
        self._corked, self._corked_size = [], 0
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def close(self, reason: str = "") -> None:
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason or "closed locally"
        if self._transport is not None:
            self._flush()
            # asyncio flushes the write buffer before closing the socket.
            self._transport.close()

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        """Drop the connection without flushing (shutdown of a stuck peer)."""
        self._closing = True
        if not self._close_reason:
            self._close_reason = "aborted"
        self._corked, self._corked_size = [], 0
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = _format_peer(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Frames are latency-sensitive messages; never wait to coalesce them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(getattr(transport, "max_size", None), int):
            # asyncio reads at most 256 KiB per recv: less than one media block with its
            # framing, so every block would span two reads and be assembled from pieces.
            transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        self._session = self._factory(self)
        # The session's read limit judges each header before its payload is buffered.
        self._decoder = FrameDecoder(read_limit_of(self._session))

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None or self._closing:
            return
        try:
            frames = self._decoder.feed(data)
            for frame in frames:
                session.frame_received(frame)
                if self.is_closing():  # the session closed us; drop the rest
                    return
            if frames:
                # Surfaces an error the decoder held back to deliver the frames before it.
                self._decoder.feed(b"")
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("session failed on a frame from %s; closing", self._peer)
            self.close("internal error")

    def eof_received(self) -> bool | None:
        if self._session is not None and not self._closing:
            try:
                self._decoder.eof()
            except ProtocolError as exc:
                self._protocol_error(exc)
        if not self._close_reason:
            self._close_reason = "closed by peer"
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if exc is not None and not self._close_reason:
            self._close_reason = f"connection error: {exc}"
        reason = self._close_reason or "closed by peer"
        try:
            if self._session is not None:
                self._session.connection_lost(reason)
        finally:
            if not self.done.done():
                self.done.set_result(None)

    def _protocol_error(self, exc: ProtocolError) -> None:
        assert self._session is not None
        try:
            self._session.protocol_error(exc)
        finally:
            self.close(f"protocol error: {exc}")


class TcpListener:
    """A listening TCP server; closing it also closes the connections it accepted."""

    def __init__(self, server: asyncio.Server, connections: set[TcpConnection]) -> None:
        self._server = server
        self._connections = connections

    @property
    def port(self) -> int:
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        self._server.close()
        for conn in list(self._connections):
            conn.close("server shutting down")

    async def wait_closed(self) -> None:
        pending = [c.done for c in self._connections if not c.done.done()]
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=_CLOSE_GRACE)
            if stuck:
                for conn in list(self._connections):
                    if not conn.done.done():
                        conn.abort()
                await asyncio.wait(stuck, timeout=1.0)
        await self._server.wait_closed()


async def serve_tcp(
    host: str,
    port: int,
    factory: SessionFactory,
    *,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> Listener:
    """Listen on ``host:port`` (0 = ephemeral); one session per accepted connection."""
    loop = asyncio.get_running_loop()
    connections: set[TcpConnection] = set()

    def make() -> TcpConnection:
        conn = TcpConnection(factory, max_buffered)
        connections.add(conn)
        conn.done.add_done_callback(lambda _f: connections.discard(conn))
        return conn

    server = await loop.create_server(make, host, port)
    return TcpListener(server, connections)


async def connect_tcp(
    host: str,
    port: int,
    factory: SessionFactory,
    *,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> FrameSink:
    """Open a client connection; ``factory`` is called once, before this returns."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: TcpConnection(factory, max_buffered), host, port
    )
    return conn
