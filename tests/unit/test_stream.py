"""The streaming decoder: arbitrary chunking, bounded buffering, typed and sticky errors."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from kalandra_core.proto import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameRefused,
    FrameTooShort,
    FrameTruncated,
    Goodbye,
    InvalidMagic,
    Opcode,
    PayloadTooLarge,
    ReadLimit,
    SkippedFrame,
)


def _frames() -> list[Frame]:
    return [
        Frame.build(FrameHeader(Opcode.GOODBYE, room_id=i), Goodbye(reason="x" * i))
        for i in range(5)
    ] + [Frame.new(FrameHeader(Opcode.PING))]


def test_one_byte_at_a_time() -> None:
    frames = _frames()
    stream = b"".join(f.encode() for f in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
        assert dec.buffered <= HEADER_SIZE + 5 + 20
    assert out == frames
    assert dec.at_frame_boundary
    dec.eof()


@pytest.mark.parametrize("chunk", [1, 7, 127, 128, 129, 300, 10_000])
def test_any_chunk_size(chunk: int) -> None:
    frames = _frames()
    stream = b"".join(f.encode() for f in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(stream), chunk):
        out += dec.feed(memoryview(stream)[i : i + chunk])
    assert out == frames


def test_empty_payload_frame_completes_with_its_header() -> None:
    dec = FrameDecoder()
    ping = Frame.new(FrameHeader(Opcode.PING)).encode()
    assert dec.feed(ping[:100]) == []
    assert len(dec.feed(ping[100:])) == 1


def test_bad_header_raises_before_any_payload_is_buffered() -> None:
    header = bytearray(FrameHeader(Opcode.APP_MESSAGE).to_bytes())
    header[12:16] = struct.pack(">I", 0xFFFFFFFF)
    dec = FrameDecoder()
    dec.feed(header[:100])
    with pytest.raises(PayloadTooLarge):
        dec.feed(header[100:])
    assert dec.buffered == 0
    # Sticky: the stream lost its framing.
    with pytest.raises(PayloadTooLarge):
        dec.feed(b"more")


def test_good_frames_before_garbage_are_delivered_first() -> None:
    good = Frame.new(FrameHeader(Opcode.PING)).encode()
    dec = FrameDecoder()
    assert len(dec.feed(good + b"X" * 200)) == 1
    with pytest.raises(InvalidMagic):
        dec.feed(b"")
    with pytest.raises(InvalidMagic):
        dec.eof()


def test_eof_inside_a_frame_is_reported() -> None:
    frame = Frame.build(FrameHeader(Opcode.GOODBYE), Goodbye(reason="bye")).encode()
    dec = FrameDecoder()
    dec.feed(frame[:50])
    with pytest.raises(FrameTooShort):
        dec.eof()
    dec = FrameDecoder()
    dec.feed(frame[:-1])
    with pytest.raises(FrameTruncated):
        dec.eof()


def test_max_payload_frame_buffers_exactly_its_size() -> None:
    frame = Frame.new(FrameHeader(Opcode.APP_EDIT), bytes(MAX_PAYLOAD_SIZE))
    raw = frame.encode()
    dec = FrameDecoder()
    assert dec.feed(raw[:-1]) == []
    assert dec.buffered == HEADER_SIZE + MAX_PAYLOAD_SIZE - 1 <= dec.max_buffered
    (out,) = dec.feed(raw[-1:])
    assert out == frame


def test_a_read_limit_refuses_on_the_header_before_any_payload_byte() -> None:
    limit = ReadLimit(16, frozenset({Opcode.PING, Opcode.GOODBYE}))
    big = Frame.build(FrameHeader(Opcode.GOODBYE, request_id=3), Goodbye(reason="x" * 40))
    dec = FrameDecoder(lambda: limit)
    with pytest.raises(FrameRefused) as refused:
        dec.feed(big.encode()[:HEADER_SIZE])  # the header alone is enough
    assert refused.value.oversized
    assert refused.value.header.request_id == 3
    assert dec.buffered == 0
    with pytest.raises(FrameRefused):
        dec.feed(b"more")  # the stream is abandoned
    other = FrameDecoder(lambda: limit)
    with pytest.raises(FrameRefused) as refused:
        other.feed(Frame.new(FrameHeader(Opcode.HELLO)).encode())
    assert not refused.value.oversized


def test_an_oversized_payload_is_skipped_unread_and_framing_holds() -> None:
    limit = ReadLimit(16, skip_oversized=True)
    big = Frame.build(FrameHeader(Opcode.GOODBYE, request_id=3), Goodbye(reason="x" * 40))
    ping = Frame.new(FrameHeader(Opcode.PING, request_id=4))
    stream = big.encode() + ping.encode()
    dec = FrameDecoder(lambda: limit)
    out: list[Frame] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
        assert dec.buffered <= HEADER_SIZE
        if i == HEADER_SIZE - 1:
            assert len(out) == 1  # reported as soon as the header is in
    assert isinstance(out[0], SkippedFrame)
    assert out[0].payload == b""
    assert out[0].header.payload_size == len(big.payload)
    assert out[1:] == [ping]
    assert dec.at_frame_boundary
    dec = FrameDecoder(lambda: limit)
    dec.feed(big.encode()[:-1])
    with pytest.raises(FrameTruncated):
        dec.eof()


def test_large_payloads_from_a_reused_buffer_and_from_bytes_chunks() -> None:
    """A payload that spans many chunks comes out whole, whether the transport hands over
    ``bytes`` (kept as slices until the payload is complete) or a buffer it fills again for
    the next read (copied at once)."""
    payloads = [bytes([i]) * (300_000 + i) for i in range(3)]
    frames = [Frame.new(FrameHeader(Opcode.CAS_PUT, room_id=1), p) for p in payloads]
    stream = b"".join(f.encode() for f in frames)
    for reuse in (False, True):
        dec = FrameDecoder()
        out: list[Frame] = []
        buffer = bytearray(65_536)
        for i in range(0, len(stream), len(buffer)):
            chunk = stream[i : i + len(buffer)]
            if reuse:
                buffer[: len(chunk)] = chunk
                out += dec.feed(memoryview(buffer)[: len(chunk)])
                buffer[:] = bytes(len(buffer))  # the owner reuses its buffer
            else:
                out += dec.feed(chunk)
        assert [f.payload for f in out] == payloads
        assert all(isinstance(f.payload, bytes) for f in out)
        assert dec.at_frame_boundary


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_memory_for_a_payload_stays_near_its_size_however_it_is_chunked(chunk: int) -> None:
    """A peer that sends a large payload a byte per packet must not make the server hold an
    object per read: that would be a couple of hundred bytes held per byte received."""
    size = 200_000
    raw = Frame.new(FrameHeader(Opcode.CAS_PUT, room_id=1), bytes(size)).encode()
    body = raw[:-1]  # all but the last byte: the frame stays in progress
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for piece in chunks:
            assert dec.feed(piece) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * size, f"{peak} bytes held for a {size}-byte payload in {chunk}-byte reads"
