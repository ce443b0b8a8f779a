"""Wire-format rates: header parse, full frame decode, encode and stream decoding.

The limit is ``struct.unpack_from`` of all header fields from 128 bytes: the least any Python
header parser must do. Target (docs/performance-targets.md): at least 1,000,000 header
parses per second.
"""

from __future__ import annotations

import os
import struct

from kalandra_core.proto import (
    EncryptedMessage,
    Frame,
    FrameDecoder,
    FrameHeader,
    Opcode,
    decode_payload,
)

from .common import Figure, Results, rate

_ALL_FIELDS = struct.Struct(">IBBHIIQQQQQQ64s")


def _sample_frame(body: int) -> Frame:
    msg = EncryptedMessage(
        epoch=7,
        sender_index=3,
        generation=1234,
        nonce=os.urandom(24),
        ciphertext=os.urandom(body + 16),
    )
    header = FrameHeader(
        Opcode.APP_MESSAGE,
        room_id=0x1234,
        sender_id=42,
        epoch=7,
        hlc_timestamp=7130316800000000005,
        signature=os.urandom(64),
    )
    return Frame.build(header, msg)


def run(quick: bool) -> Results:
    batch, repeats = (50_000, 5) if quick else (200_000, 15)
    frame = _sample_frame(100)
    raw = frame.encode()
    view = memoryview(raw)
    unpack = _ALL_FIELDS.unpack_from
    parse = FrameHeader.parse
    decode = Frame.decode

    limit = rate(lambda: unpack(view), batch, repeats)
    header_rate = rate(lambda: parse(view), batch, repeats)

    def full_decode() -> object:
        f = decode(view)
        return decode_payload(f.header.opcode, f.payload)

    full_rate = rate(full_decode, batch // 5, repeats)

    payload = frame.decode_payload()
    header = frame.header

    def encode() -> bytes:
        return Frame.build(header, payload).encode()

    encode_rate = rate(encode, batch // 5, repeats)

    # A TCP-like stream: 256 frames arriving in 64 KiB reads.
    stream = raw * 256
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    def stream_decode() -> None:
        dec = FrameDecoder()
        for c in chunks:
            dec.feed(c)

    stream_rate = rate(stream_decode, max(batch // 5000, 10), repeats) * 256

    name = "unpack_from(128 B)"
    return Results(
        [
            Figure("header parse", header_rate, "/s", ">= 1,000,000 /s", name, limit),
            Figure("frame decode + CBOR payload (100 B msg)", full_rate, "/s", "-", name, limit),
            Figure("frame encode (100 B msg)", encode_rate, "/s", "-", name, limit),
            Figure("stream decode, 64 KiB reads", stream_rate, "/s", "-", name, limit),
        ]
    )
