"""An in-process connection to a running :class:`~kalandra_core.server.hub.Hub`: no sockets.

The bridge embeds the homeserver and talks to it as an ordinary client (its own member, its
own MLS state), so the server checks the bridge exactly like any native client.
:func:`loopback_connector` is a :data:`~kalandra_core.client.driver.Connector` for
``Client(connector=...)``.

A connection is two in-memory :class:`~kalandra_core.transport.interface.FrameSink` ends. A frame
is passed as bytes (decoded on arrival, as a transport would) and delivered on a later turn of
the event loop (``loop.call_soon``), so a session never re-enters its peer while sending, and
FIFO scheduling keeps each direction in order. ``close`` on either end delivers what is already
queued, then calls ``connection_lost`` on both sessions, each exactly once (as TCP does: the
closing side's transport reports the loss too). Flow control follows the TCP rule
(:func:`~kalandra_core.transport.tcp.may_queue`): ``buffered`` counts bytes sent and not yet
delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..proto import Frame, ProtocolError
from ..proto.header import HEADER_SIZE
from .interface import DEFAULT_MAX_BUFFERED, FrameSink, Session, SessionFactory
from .tcp import may_queue

log = logging.getLogger("kalandra.transport.loopback")
_ids = itertools.count(1)


class _Pipe:
    """The shared state of one connection: its two ends and whether it is closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_buffered: int) -> None:
        self.loop = loop
        self.max_buffered = max_buffered
        self.closed = False
        self.reason = ""
        number = next(_ids)
        self.client = LoopbackEnd(self, f"loopback-server#{number}")
        self.server = LoopbackEnd(self, f"loopback-client#{number}")
        self.client.other = self.server
        self.server.other = self.client

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason or "closed"
        # Behind the frames already scheduled: they are delivered first (a flush).
        self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        for end in (self.client, self.server):
            end.lost(self.reason)


class LoopbackEnd:
    """One end's FrameSink: ``send`` writes toward the other end's session."""

    def __init__(self, pipe: _Pipe, peer: str) -> None:
        self._pipe = pipe
        self._peer = peer
        self.other: LoopbackEnd
        self.session: Session | None = None  # the session that reads what arrives here
        self._buffered = 0
        self._lost = False

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def buffered(self) -> int:
        return self._buffered

    def send(self, frame: bytes) -> bool:
        pipe = self._pipe
        if pipe.closed or not may_queue(self._buffered, len(frame), pipe.max_buffered):
            return False
        self._buffered += len(frame)
        pipe.loop.call_soon(self.other._arrive, self, bytes(frame))
        return True

    def close(self, reason: str = "") -> None:
        self._pipe.close(reason or "closed locally")

    # --- the receiving side ------------------------------------------------------------------

    def _arrive(self, sender: LoopbackEnd, data: bytes) -> None:
        sender._buffered -= len(data)
        session = self.session
        if session is None or self._lost:
            return
        try:
            frame = Frame.decode(data)
            if len(data) != HEADER_SIZE + frame.header.payload_size:
                raise ProtocolError("a loopback send must be exactly one frame")
        except ProtocolError as exc:
            session.protocol_error(exc)
            self._pipe.close(f"protocol error: {exc}")
            return
        try:
            session.frame_received(frame)
        except Exception:
            log.exception("session failed on a frame from %s; closing", self._peer)
            self._pipe.close("internal error")

    def lost(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if self.session is not None:
            self.session.connection_lost(reason)


def connect_loopback(
    server_factory: SessionFactory,
    client_factory: SessionFactory,
    *,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> FrameSink:
    """Open a connection; returns the client's sink (the server's goes to ``server_factory``).

    Must run inside the event loop. The server session is created first, then the client's,
    as with a real transport (the server is listening before the client connects)."""
    pipe = _Pipe(asyncio.get_running_loop(), max_buffered)
    pipe.server.session = server_factory(pipe.server)
    pipe.client.session = client_factory(pipe.client)
    return pipe.client


def loopback_connector(
    server_factory: SessionFactory, *, max_buffered: int = DEFAULT_MAX_BUFFERED
) -> Callable[[Any, SessionFactory, bytes | None], Awaitable[FrameSink]]:
    """A ``Connector`` for :class:`~kalandra_core.client.driver.Client` that ignores the
    address and CA and connects to ``server_factory`` (``hub.session_factory``) in-process."""

    async def connect(
        _address: Any, client_factory: SessionFactory, _ca: bytes | None
    ) -> FrameSink:
        return connect_loopback(server_factory, client_factory, max_buffered=max_buffered)

    return connect
