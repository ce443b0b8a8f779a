"""Header layout, validation order and field access."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from kalandra_core.proto import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD_SIZE,
    Flags,
    Frame,
    FrameHeader,
    FrameTooShort,
    FrameTruncated,
    InvalidMagic,
    Opcode,
    PayloadTooLarge,
    UnsupportedVersion,
    opcode_from_name,
    opcode_name,
)


def _header(**kw: Any) -> bytearray:
    return bytearray(FrameHeader(Opcode.APP_MESSAGE, **kw).to_bytes())


def test_layout_is_big_endian_at_the_documented_offsets() -> None:
    h = FrameHeader(
        Opcode.COMMIT,
        flags=0x41,
        request_id=0x01020304,
        payload_size=0x0A0B0C0D,
        room_id=0x00112233445566778899AABBCCDDEEFF,
        sender_id=0x1122334455667788,
        context_id=0x99,
        hlc_timestamp=0x62F3F95A00000005,
        epoch=0xFFFFFFFFFFFFFFFE,
        signature=bytes(range(64)),
    )
    raw = h.to_bytes()
    assert len(raw) == HEADER_SIZE
    assert raw[0:4] == b"SUND"
    assert raw[4] == 1
    assert raw[5] == 0x41
    assert raw[6:8] == b"\x10\x02"
    assert raw[8:12] == bytes.fromhex("01020304")
    assert raw[12:16] == bytes.fromhex("0a0b0c0d")
    assert raw[16:32] == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert raw[32:40] == bytes.fromhex("1122334455667788")
    assert raw[40:48] == (0x99).to_bytes(8, "big")
    assert raw[48:56] == bytes.fromhex("62f3f95a00000005")
    assert raw[56:64] == (0xFFFFFFFFFFFFFFFE).to_bytes(8, "big")
    assert raw[64:128] == bytes(range(64))
    assert h.signing_data() == raw[0:40] + raw[48:64]
    assert len(h.signing_data()) == 56


def test_default_header_is_reference_header_new() -> None:
    raw = FrameHeader(Opcode.PING).to_bytes()
    assert raw == struct.pack(">IBBH", MAGIC, 1, 0, 4) + bytes(120)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b[:127], FrameTooShort),
        (lambda b: b"", FrameTooShort),
        (lambda b: b"XXXX" + b[4:], InvalidMagic),
        (lambda b: b[:4] + b"\x02" + b[5:], UnsupportedVersion),
        (lambda b: b[:12] + struct.pack(">I", MAX_PAYLOAD_SIZE + 1) + b[16:], PayloadTooLarge),
    ],
)
def test_each_check_raises_its_error(mutate, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        FrameHeader.parse(mutate(bytes(_header())))


def test_validation_order_matches_reference() -> None:
    # Bad magic AND bad version AND oversized: magic is reported first.
    raw = _header()
    raw[0:4] = b"ABCD"
    raw[4] = 9
    raw[12:16] = struct.pack(">I", 0xFFFFFFFF)
    with pytest.raises(InvalidMagic):
        FrameHeader.parse(raw)
    raw[0:4] = b"SUND"
    with pytest.raises(UnsupportedVersion) as exc:
        FrameHeader.parse(raw)
    assert exc.value.version == 9
    raw[4] = 1
    with pytest.raises(PayloadTooLarge) as too_large:
        FrameHeader.parse(raw)
    assert too_large.value.size == 0xFFFFFFFF
    # A short buffer is reported before its (garbage) magic.
    with pytest.raises(FrameTooShort) as short:
        FrameHeader.parse(b"junk")
    assert (short.value.expected, short.value.actual) == (128, 4)


def test_exactly_16_mib_is_allowed() -> None:
    raw = _header(payload_size=MAX_PAYLOAD_SIZE)
    assert FrameHeader.parse(raw).payload_size == MAX_PAYLOAD_SIZE


def test_unknown_opcode_and_all_flags_parse() -> None:
    raw = _header()
    raw[5] = 0xFF
    raw[6:8] = b"\x77\x77"
    h = FrameHeader.parse(raw)
    assert h.opcode == 0x7777
    assert h.opcode_enum is None
    assert h.opcode_name == "Unknown(0x7777)"
    assert int(h.flags) == 0xFF
    assert Flags.EXTERNAL in h.flags


def test_truncated_payload_and_trailing_bytes() -> None:
    frame = Frame.new(FrameHeader(Opcode.GOODBYE), b"0123456789")
    raw = frame.encode()
    with pytest.raises(FrameTruncated) as exc:
        Frame.decode(raw[:-1])
    assert (exc.value.expected, exc.value.actual) == (10, 9)
    # Trailing bytes after the payload are ignored, as in the reference.
    assert Frame.decode(raw + b"extra") == frame


def test_parse_copies_and_accepts_memoryview() -> None:
    raw = bytearray(_header(epoch=5))
    h = FrameHeader.parse(memoryview(raw))
    raw[63] = 9  # caller's buffer changes later
    assert h.epoch == 5


def test_setters_write_in_place_and_validate() -> None:
    h = FrameHeader(Opcode.APP_MESSAGE, sender_id=1)
    h.context_id = 42
    h.epoch = 7
    h.room_id = (1 << 128) - 1
    h.request_id = 9
    assert (h.log_index, h.recipient_id, h.epoch, h.request_id) == (42, 42, 7, 9)
    assert h.room_id_bytes == b"\xff" * 16
    with pytest.raises(ValueError, match="context_id"):
        h.context_id = -1
    with pytest.raises(ValueError, match="room_id"):
        h.room_id = 1 << 128
    with pytest.raises(ValueError, match="signature"):
        h.signature = b"short"
    with pytest.raises(ValueError, match="epoch"):
        FrameHeader(Opcode.PING, epoch=1 << 64)


def test_frame_new_sets_payload_size_and_rejects_oversize() -> None:
    header = FrameHeader(Opcode.APP_MESSAGE, payload_size=999)
    frame = Frame.new(header, b"abc")
    assert frame.header.payload_size == 3
    with pytest.raises(PayloadTooLarge):
        Frame.new(FrameHeader(Opcode.APP_MESSAGE), bytes(MAX_PAYLOAD_SIZE + 1))


def test_opcode_names_cover_every_opcode() -> None:
    assert len(Opcode) == 39
    for op in Opcode:
        assert opcode_from_name(opcode_name(op)) is op
        assert opcode_from_name(op.name) is op
    assert opcode_name(0x1003) == "Welcome"
    assert opcode_name(0x5000) == "CASPut"
    with pytest.raises(ValueError, match="unknown opcode"):
        opcode_from_name("Nope")
