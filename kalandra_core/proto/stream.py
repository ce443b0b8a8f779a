"""Incremental frame decoder for byte streams (TCP, a QUIC stream).

Sans-IO: feed it whatever chunks the transport delivers, get whole frames back. It buffers at
most one header plus one payload (128 + 16 MiB): a header is validated as soon as its 128 bytes
are in, so a bad one raises before any payload byte is kept, and ``payload_size`` is never used
to allocate anything up front. After an error the decoder stays failed (the stream has lost
framing and cannot be resynchronised).

A :class:`ReadLimit` (asked of the ``limit`` callable at each header, so its owner may change
it, e.g. once a session is authenticated) judges every header before its payload is read: an
opcode it does not list, or a payload over its size, raises :class:`FrameRefused` (fatal), or,
with ``skip_oversized``, an oversized payload is skipped unread and reported at once as a
:class:`SkippedFrame` (the header alone), so a peer can never make the decoder buffer more than
the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import FrameTooShort, FrameTruncated, ProtocolError
from .frame import Frame
from .header import HEADER_SIZE, MAX_PAYLOAD_SIZE, FrameHeader

_KEEP_MIN = 16 * 1024  # bytes: a slice of a received chunk at least this long is kept, not copied


@dataclass(frozen=True, slots=True)
class ReadLimit:
    """What a decoder takes, judged on the header alone."""

    max_payload_size: int = MAX_PAYLOAD_SIZE
    opcodes: frozenset[int] | None = None  # None: every opcode
    skip_oversized: bool = False  # an oversized payload is skipped (True) or fatal (False)


class FrameRefused(ProtocolError):
    """A header its read limit refuses; the payload was not read and the stream is abandoned."""

    def __init__(self, header: FrameHeader, limit: ReadLimit) -> None:
        self.header = header
        self.limit = limit.max_payload_size
        self.oversized = header.payload_size > limit.max_payload_size
        if limit.opcodes is not None and header.opcode not in limit.opcodes:
            self.oversized = False
            why = f"{header.opcode_name} frames are not accepted here"
        else:
            why = f"payload of {header.payload_size} bytes; the limit here is {self.limit} bytes"
        super().__init__(f"frame refused: {why}")


@dataclass(slots=True, eq=True)
class SkippedFrame(Frame):
    """A frame whose payload was over the read limit and skipped unread: its header, with an
    empty ``payload`` (``header.payload_size`` still says what was announced)."""


class FrameDecoder:
    __slots__ = ("_buf", "_error", "_have", "_header", "_limit", "_parts", "_skip")

    def __init__(self, limit: Callable[[], ReadLimit] | None = None) -> None:
        self._buf = bytearray()  # a header being assembled
        # A payload being assembled: its chunks, joined once complete (one copy of a large
        # payload rather than one per chunk it spans and one more to make it bytes).
        self._parts: list[memoryview | bytearray] = []
        self._have = 0
        self._header: FrameHeader | None = None
        self._error: ProtocolError | None = None
        self._limit = limit
        self._skip = 0  # payload bytes still to discard (a SkippedFrame's)

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (never more than 128 + 16 MiB)."""
        return len(self._buf) + self._have + (HEADER_SIZE if self._header is not None else 0)

    @property
    def max_buffered(self) -> int:
        return HEADER_SIZE + MAX_PAYLOAD_SIZE

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the stream to end)."""
        return self._header is None and not self._buf and not self._skip and not self._have

    def _admit(self, header: FrameHeader) -> bool:
        """Whether to read this header's payload (False: skip it); raises if refused."""
        if self._limit is None:
            return True
        limit = self._limit()
        if limit.opcodes is not None and header.opcode not in limit.opcodes:
            raise FrameRefused(header, limit)
        if header.payload_size <= limit.max_payload_size:
            return True
        if not limit.skip_oversized:
            raise FrameRefused(header, limit)
        return False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data``; return the frames it completed, in order.

        Raises the first ProtocolError the stream hits, and again on every later call; frames
        completed in the same chunk before the bad bytes are returned first.
        """
        if self._error is not None:
            raise self._error
        frames: list[Frame] = []
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        try:
            while view:
                if self._skip:
                    taken = min(self._skip, len(view))
                    self._skip -= taken
                    view = view[taken:]
                    continue
                if self._header is None:
                    if not self._buf and len(view) >= HEADER_SIZE:
                        # Fast path: parse straight from the caller's chunk.
                        header = FrameHeader.parse(view)
                        view = view[HEADER_SIZE:]
                        if not self._admit(header):
                            frames.append(SkippedFrame(header, b""))
                            self._skip = header.payload_size
                            continue
                        size = header.payload_size
                        if len(view) >= size:
                            frames.append(Frame(header, bytes(view[:size])))
                            view = view[size:]
                            continue
                        self._header = header
                        continue
                    need = HEADER_SIZE - len(self._buf)
                    self._buf += view[:need]
                    view = view[need:]
                    if len(self._buf) < HEADER_SIZE:
                        break
                    header = FrameHeader.parse(self._buf)
                    self._buf.clear()
                    if not self._admit(header):
                        frames.append(SkippedFrame(header, b""))
                        self._skip = header.payload_size
                        continue
                    self._header = header
                    continue
                need = self._header.payload_size - self._have
                part = view[:need]
                view = view[need:]
                # A large slice of an immutable chunk is kept as is; any other buffer may be
                # reused by its owner, so its bytes are copied. Small pieces are copied into
                # one growing tail: an object per read would hold a couple of hundred bytes
                # for each byte a peer sends one packet at a time.
                if isinstance(data, bytes) and len(part) >= _KEEP_MIN:
                    self._parts.append(part)
                elif self._parts and isinstance(self._parts[-1], bytearray):
                    self._parts[-1] += part
                else:
                    self._parts.append(bytearray(part))
                self._have += len(part)
                if self._have < self._header.payload_size:
                    break
                frames.append(Frame(self._header, b"".join(self._parts)))
                self._header = None
                self._parts.clear()
                self._have = 0
            # A header announcing an empty payload completes without further bytes.
            if self._header is not None and self._header.payload_size == 0:
                frames.append(Frame(self._header, b""))
                self._header = None
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._parts = []
            self._have = 0
            self._header = None
            self._skip = 0
            if not frames:
                raise
            # Deliver the good frames that preceded the bad bytes; the next call raises.
        return frames

    def eof(self) -> None:
        """The stream ended: raise if it stopped inside a frame (or had already failed)."""
        if self._error is not None:
            raise self._error
        if self._header is not None:
            raise FrameTruncated(self._header.payload_size, self._have)
        if self._skip:
            raise FrameTruncated(self._skip, 0)
        if self._buf:
            raise FrameTooShort(HEADER_SIZE, len(self._buf))
