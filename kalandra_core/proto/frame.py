"""A frame: the 128-byte header followed by ``payload_size`` bytes of payload."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FrameTruncated, PayloadTooLarge
from .header import HEADER_SIZE, MAX_PAYLOAD_SIZE, FrameHeader
from .payloads import Payload, decode_payload


@dataclass(slots=True, eq=True)
class Frame:
    header: FrameHeader
    payload: bytes

    @classmethod
    def new(cls, header: FrameHeader, payload: bytes = b"") -> Frame:
        """Pair a header with a payload, setting ``payload_size`` from the payload.

        Sign only after this: ``payload_size`` is covered by the signature.
        """
        if len(payload) > MAX_PAYLOAD_SIZE:
            raise PayloadTooLarge(len(payload), MAX_PAYLOAD_SIZE)
        header.payload_size = len(payload)
        return cls(header, bytes(payload))

    @classmethod
    def build(cls, header: FrameHeader, payload: Payload | bytes) -> Frame:
        """Like :meth:`new`, encoding a typed payload first."""
        data = payload if isinstance(payload, bytes) else payload.encode()
        return cls.new(header, data)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> Frame:
        """Decode one frame from the start of ``buf``; bytes after the payload are ignored."""
        header = FrameHeader.parse(buf)
        size = header.payload_size
        available = len(buf) - HEADER_SIZE
        if available < size:
            raise FrameTruncated(size, available)
        return cls(header, bytes(buf[HEADER_SIZE : HEADER_SIZE + size]))

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD_SIZE:
            raise PayloadTooLarge(len(self.payload), MAX_PAYLOAD_SIZE)
        return self.header.to_bytes() + self.payload

    def decode_payload(self) -> Payload:
        """The typed payload for this frame's opcode (see :func:`payloads.decode_payload`)."""
        return decode_payload(self.header.opcode, self.payload)

    def __len__(self) -> int:
        return HEADER_SIZE + len(self.payload)
