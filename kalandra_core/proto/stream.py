"""Incremental frame decoder for byte streams (TCP, a QUIC stream).

Sans-IO: feed it whatever chunks the transport delivers, get whole frames back. It buffers at
most one header plus one payload (128 + 16 MiB): a header is validated as soon as its 128 bytes
are in, so a bad one raises before any payload byte is kept, and ``payload_size`` is never used
to allocate anything up front. After an error the decoder stays failed (the stream has lost
framing and cannot be resynchronised).
"""

from __future__ import annotations

from .errors import FrameTooShort, FrameTruncated, ProtocolError
from .frame import Frame
from .header import HEADER_SIZE, MAX_PAYLOAD_SIZE, FrameHeader


class FrameDecoder:
    __slots__ = ("_buf", "_error", "_header")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (never more than 128 + 16 MiB)."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    @property
    def max_buffered(self) -> int:
        return HEADER_SIZE + MAX_PAYLOAD_SIZE

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the stream to end)."""
        return self._header is None and not self._buf

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
                if self._header is None:
                    if not self._buf and len(view) >= HEADER_SIZE:
                        # Fast path: parse straight from the caller's chunk.
                        header = FrameHeader.parse(view)
                        size = header.payload_size
                        end = HEADER_SIZE + size
                        if len(view) >= end:
                            frames.append(Frame(header, bytes(view[HEADER_SIZE:end])))
                            view = view[end:]
                            continue
                        self._header = header
                        view = view[HEADER_SIZE:]
                        continue
                    need = HEADER_SIZE - len(self._buf)
                    self._buf += view[:need]
                    view = view[need:]
                    if len(self._buf) < HEADER_SIZE:
                        break
                    self._header = FrameHeader.parse(self._buf)
                    self._buf.clear()
                    continue
                need = self._header.payload_size - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < self._header.payload_size:
                    break
                frames.append(Frame(self._header, bytes(self._buf)))
                self._header = None
                self._buf.clear()
            # A header announcing an empty payload completes without further bytes.
            if self._header is not None and self._header.payload_size == 0:
                frames.append(Frame(self._header, b""))
                self._header = None
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._header = None
            if not frames:
                raise
            # Deliver the good frames that preceded the bad bytes; the next call raises.
        return frames

    def eof(self) -> None:
        """The stream ended: raise if it stopped inside a frame (or had already failed)."""
        if self._error is not None:
            raise self._error
        if self._header is not None:
            raise FrameTruncated(self._header.payload_size, len(self._buf))
        if self._buf:
            raise FrameTooShort(HEADER_SIZE, len(self._buf))
