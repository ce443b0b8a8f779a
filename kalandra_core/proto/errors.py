"""Typed errors raised while parsing or building frames and payloads.

Every failure of the wire layer is a ``ProtocolError`` subclass, so callers (the stream decoder,
the server, the CLI) can catch one type and turn it into an Error frame or a one-line message.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every wire-format error."""


class FrameTooShort(ProtocolError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"frame too short: need {expected} header bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class InvalidMagic(ProtocolError):
    def __init__(self, magic: int) -> None:
        super().__init__(f"invalid magic 0x{magic:08x} (expected 0x53554e44 'SUND')")
        self.magic = magic


class UnsupportedVersion(ProtocolError):
    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported protocol version {version} (expected 1)")
        self.version = version


class PayloadTooLarge(ProtocolError):
    def __init__(self, size: int, maximum: int) -> None:
        super().__init__(f"payload too large: {size} bytes (maximum {maximum})")
        self.size = size
        self.maximum = maximum


class FrameTruncated(ProtocolError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"frame truncated: payload needs {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class PayloadDecodeError(ProtocolError):
    """The payload is not valid CBOR, or not the shape its opcode requires."""


class UnsupportedOpcode(PayloadDecodeError):
    def __init__(self, opcode: int) -> None:
        super().__init__(f"unsupported opcode 0x{opcode:04x}: no payload type")
        self.opcode = opcode


class PayloadEncodeError(ProtocolError):
    """A payload value cannot be represented on the wire (wrong type, out of range)."""
