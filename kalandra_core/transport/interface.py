"""The contract between transports (TCP, QUIC) and the protocol code above them.

Transports move whole frames; they never interpret them. For each connection a transport asks a
``SessionFactory`` for a :class:`Session` and hands it a :class:`FrameSink` to write with. The
same contract serves the server (one session per accepted connection) and the client (one
session per outgoing connection).

* TCP carries frames back to back in each direction; the transport runs a
  :class:`~kalandra_core.proto.FrameDecoder` over the byte stream.
* QUIC (ALPN "kalandra", as the reference): the client writes frames back to back on one
  bidirectional stream; the server sends every frame on its own unidirectional stream (open,
  write, finish) and never writes on the bidirectional one. So frames from the server may arrive
  out of order; room frames carry log indexes, and clients order by them.

Flow control: ``send`` never blocks. A transport tracks the bytes it has not yet handed to the
kernel/QUIC stack; past ``max_buffered`` it refuses the frame (returns False) and the caller
closes the connection, so one slow reader cannot stall a room.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..proto import Frame, ProtocolError, ReadLimit

DEFAULT_MAX_BUFFERED = 8 * 1024 * 1024
ALPN = "kalandra"


class FrameSink(Protocol):
    @property
    def peer(self) -> str:
        """Printable remote address (for logs)."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes queued for this connection and not yet written out."""
        ...

    def send(self, frame: bytes) -> bool:
        """Queue one encoded frame. False (frame dropped) when the buffer limit is exceeded."""
        ...

    def close(self, reason: str = "") -> None:
        """Flush what is queued (best effort) and close. Idempotent."""
        ...


class Session(Protocol):
    def frame_received(self, frame: Frame) -> None:
        """One complete frame from the peer (header validated, payload not yet decoded)."""
        ...

    def protocol_error(self, error: ProtocolError) -> None:
        """The incoming stream lost framing (bad header, ...). The transport closes afterwards
        unless the session already did; the session may send an Error frame first."""
        ...

    def connection_lost(self, reason: str) -> None:
        """The connection is gone (peer closed, network error, or we closed it)."""
        ...


@runtime_checkable
class ReadLimited(Protocol):
    """A session that limits what its transport reads (the server's): the transport's decoder
    asks it at each header, and refuses or skips a frame before its payload is read."""

    def read_limit(self) -> ReadLimit: ...


def read_limit_of(session: Session) -> Callable[[], ReadLimit] | None:
    return session.read_limit if isinstance(session, ReadLimited) else None


SessionFactory = Callable[[FrameSink], Session]


class Listener(Protocol):
    """A running server-side transport."""

    @property
    def port(self) -> int: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...
