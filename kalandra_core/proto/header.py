"""The 128-byte frame header.

A header *is* its 128 bytes: ``FrameHeader`` keeps them in a bytearray and reads or writes each
field in place with precompiled structs. Parsing therefore costs one small ``unpack_from`` for the
checks plus one 128-byte copy, and re-encoding a received header (e.g. after the sequencer wrote
the log index into ``context_id``) is a plain copy that can never change a byte it did not mean
to. All integers are big-endian; ``room_id`` is a u128.
"""

from __future__ import annotations

import struct
from typing import Final

from .errors import FrameTooShort, InvalidMagic, PayloadTooLarge, UnsupportedVersion
from .opcodes import Flags, Opcode, opcode_name

HEADER_SIZE: Final = 128
MAGIC: Final = 0x53554E44  # "SUND"
VERSION: Final = 1
MAX_PAYLOAD_SIZE: Final = 16 * 1024 * 1024
SIGNATURE_SIZE: Final = 64

# Validation needs magic, version and payload_size only; one unpack covers the first 16 bytes.
_CHECK = struct.Struct(">IB7xI")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U128 = struct.Struct(">QQ")
_ALL = struct.Struct(">IBBHIIQQQQQQ64s")

_OFF_FLAGS = 5
_OFF_OPCODE = 6
_OFF_REQUEST_ID = 8
_OFF_PAYLOAD_SIZE = 12
_OFF_ROOM_ID = 16
_OFF_SENDER_ID = 32
_OFF_CONTEXT_ID = 40
_OFF_HLC = 48
_OFF_EPOCH = 56
_OFF_SIGNATURE = 64

_U64_MAX = (1 << 64) - 1
_U128_MAX = (1 << 128) - 1


def _check(buf: bytes | bytearray | memoryview) -> None:
    """Run the reference's header checks, in its order, on the first bytes of ``buf``."""
    n = len(buf)
    if n < HEADER_SIZE:
        raise FrameTooShort(HEADER_SIZE, n)
    magic, version, payload_size = _CHECK.unpack_from(buf)
    if magic != MAGIC:
        raise InvalidMagic(magic)
    if version != VERSION:
        raise UnsupportedVersion(version)
    if payload_size > MAX_PAYLOAD_SIZE:
        raise PayloadTooLarge(payload_size, MAX_PAYLOAD_SIZE)


def _uint(name: str, value: int, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an unsigned {bits}-bit integer, got {value!r}")
    return value


class FrameHeader:
    """A mutable view of one 128-byte header. Fields are properties over the raw bytes (read
    straight from ``unpack_from``, which gives ints: every frame reads a dozen of them)."""

    __slots__ = ("_raw",)

    _raw: bytearray

    def __init__(
        self,
        opcode: int,
        *,
        flags: int = 0,
        request_id: int = 0,
        payload_size: int = 0,
        room_id: int = 0,
        sender_id: int = 0,
        context_id: int = 0,
        hlc_timestamp: int = 0,
        epoch: int = 0,
        signature: bytes = bytes(SIGNATURE_SIZE),
        magic: int = MAGIC,
        version: int = VERSION,
    ) -> None:
        if len(signature) != SIGNATURE_SIZE:
            raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
        _uint("payload_size", payload_size, 32)
        _uint("room_id", room_id, 128)
        self._raw = bytearray(
            _ALL.pack(
                _uint("magic", magic, 32),
                _uint("version", version, 8),
                _uint("flags", int(flags), 8),
                _uint("opcode", int(opcode), 16),
                _uint("request_id", request_id, 32),
                payload_size,
                room_id >> 64,
                room_id & _U64_MAX,
                _uint("sender_id", sender_id, 64),
                _uint("context_id", context_id, 64),
                _uint("hlc_timestamp", hlc_timestamp, 64),
                _uint("epoch", epoch, 64),
                bytes(signature),
            )
        )

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse and validate the first 128 bytes of ``buf`` (trailing bytes are ignored).

        Raises, in this order: FrameTooShort, InvalidMagic, UnsupportedVersion, PayloadTooLarge.
        Opcode, flags and signature are not checked here: every bit pattern is a valid header.
        """
        _check(buf)
        self = cls.__new__(cls)
        self._raw = bytearray(buf[:HEADER_SIZE])
        return self

    def to_bytes(self) -> bytes:
        return bytes(self._raw)

    def copy(self) -> FrameHeader:
        other = FrameHeader.__new__(FrameHeader)
        other._raw = bytearray(self._raw)
        return other

    def with_context_id(self, value: int) -> bytes:
        """The 128 bytes with ``context_id`` set to ``value`` (this header is unchanged): the
        sequencer's copy with the log index written in."""
        raw = bytearray(self._raw)
        _U64.pack_into(raw, _OFF_CONTEXT_ID, _uint("context_id", value, 64))
        return bytes(raw)

    @property
    def raw(self) -> memoryview:
        """Read-only view of the 128 header bytes."""
        return memoryview(self._raw).toreadonly()

    def signing_data(self) -> bytes:
        """Bytes covered by the frame signature: header[0:40] || header[48:64].

        context_id (log index or recipient) is excluded so the sequencer can write it after the
        sender signed; the signature itself and the payload are not covered.
        """
        raw = self._raw
        return bytes(raw[0:_OFF_CONTEXT_ID] + raw[_OFF_HLC:_OFF_SIGNATURE])

    # --- fields -----------------------------------------------------------------------------

    @property
    def magic(self) -> int:
        value: int = _U32.unpack_from(self._raw, 0)[0]
        return value

    @property
    def version(self) -> int:
        return self._raw[4]

    @property
    def flags(self) -> Flags:
        return Flags(self._raw[_OFF_FLAGS])

    @flags.setter
    def flags(self, value: int) -> None:
        _U8.pack_into(self._raw, _OFF_FLAGS, _uint("flags", int(value), 8))

    @property
    def opcode(self) -> int:
        """The raw opcode number (unknown opcodes are valid on the wire)."""
        value: int = _U16.unpack_from(self._raw, _OFF_OPCODE)[0]
        return value

    @property
    def opcode_enum(self) -> Opcode | None:
        try:
            return Opcode(self.opcode)
        except ValueError:
            return None

    @property
    def opcode_name(self) -> str:
        return opcode_name(self.opcode)

    @property
    def request_id(self) -> int:
        value: int = _U32.unpack_from(self._raw, _OFF_REQUEST_ID)[0]
        return value

    @request_id.setter
    def request_id(self, value: int) -> None:
        _U32.pack_into(self._raw, _OFF_REQUEST_ID, _uint("request_id", value, 32))

    @property
    def payload_size(self) -> int:
        value: int = _U32.unpack_from(self._raw, _OFF_PAYLOAD_SIZE)[0]
        return value

    @payload_size.setter
    def payload_size(self, value: int) -> None:
        _U32.pack_into(self._raw, _OFF_PAYLOAD_SIZE, _uint("payload_size", value, 32))

    @property
    def room_id(self) -> int:
        hi, lo = _U128.unpack_from(self._raw, _OFF_ROOM_ID)
        return int((hi << 64) | lo)

    @room_id.setter
    def room_id(self, value: int) -> None:
        _uint("room_id", value, 128)
        _U128.pack_into(self._raw, _OFF_ROOM_ID, value >> 64, value & _U64_MAX)

    @property
    def room_id_bytes(self) -> bytes:
        return bytes(self._raw[_OFF_ROOM_ID:_OFF_SENDER_ID])

    @property
    def sender_id(self) -> int:
        value: int = _U64.unpack_from(self._raw, _OFF_SENDER_ID)[0]
        return value

    @sender_id.setter
    def sender_id(self, value: int) -> None:
        _U64.pack_into(self._raw, _OFF_SENDER_ID, _uint("sender_id", value, 64))

    @property
    def context_id(self) -> int:
        """Log index for sequenced frames; recipient member id for Welcome."""
        value: int = _U64.unpack_from(self._raw, _OFF_CONTEXT_ID)[0]
        return value

    @context_id.setter
    def context_id(self, value: int) -> None:
        _U64.pack_into(self._raw, _OFF_CONTEXT_ID, _uint("context_id", value, 64))

    # Readable aliases for the two meanings of context_id.
    log_index = context_id
    recipient_id = context_id

    @property
    def hlc_timestamp(self) -> int:
        value: int = _U64.unpack_from(self._raw, _OFF_HLC)[0]
        return value

    @hlc_timestamp.setter
    def hlc_timestamp(self, value: int) -> None:
        _U64.pack_into(self._raw, _OFF_HLC, _uint("hlc_timestamp", value, 64))

    @property
    def epoch(self) -> int:
        value: int = _U64.unpack_from(self._raw, _OFF_EPOCH)[0]
        return value

    @epoch.setter
    def epoch(self, value: int) -> None:
        _U64.pack_into(self._raw, _OFF_EPOCH, _uint("epoch", value, 64))

    @property
    def signature(self) -> bytes:
        return bytes(self._raw[_OFF_SIGNATURE:HEADER_SIZE])

    @signature.setter
    def signature(self, value: bytes) -> None:
        if len(value) != SIGNATURE_SIZE:
            raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes, got {len(value)}")
        self._raw[_OFF_SIGNATURE:HEADER_SIZE] = value

    # --- dunder -------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrameHeader):
            return NotImplemented
        return self._raw == other._raw

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"FrameHeader({self.opcode_name}, room={self.room_id:032x}, sender={self.sender_id},"
            f" context={self.context_id}, epoch={self.epoch}, size={self.payload_size},"
            f" request_id={self.request_id})"
        )
