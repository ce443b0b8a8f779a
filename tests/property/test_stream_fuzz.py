"""Hostile byte streams: only typed errors, bounded buffering, no hangs; valid streams survive
any chunking."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalandra_core.proto import (
    MAX_PAYLOAD_SIZE,
    Frame,
    FrameDecoder,
    FrameHeader,
    ProtocolError,
    decode_payload,
)

VALID_PREFIX = struct.pack(">IB", 0x53554E44, 1)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


# Arbitrary bytes, and bytes that start like a real header so parsing goes deeper.
streams = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda tail: VALID_PREFIX + tail, st.binary(max_size=2000)),
    st.builds(
        lambda op, size, body: VALID_PREFIX + b"\x00" + op + struct.pack(">I", size) + body,
        st.binary(min_size=2, max_size=2),
        st.sampled_from([0, 1, 5, 100, MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE + 1, 2**32 - 1]),
        st.binary(max_size=1000),
    ),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 4000), max_size=8))
def test_arbitrary_bytes_only_raise_typed_errors(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder()
    failed = False
    for chunk in _chunks(data, cuts):
        try:
            frames = dec.feed(chunk)
        except ProtocolError:
            failed = True
            break
        assert dec.buffered <= dec.max_buffered
        for frame in frames:
            with contextlib.suppress(ProtocolError):
                decode_payload(frame.header.opcode, frame.payload)
    if not failed:
        with contextlib.suppress(ProtocolError):
            dec.eof()


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1), st.binary(max_size=600)),
        max_size=6,
    ),
    st.lists(st.integers(0, 5000), max_size=10),
)
def test_valid_streams_survive_any_chunking(
    specs: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    frames = [Frame.new(FrameHeader(op, epoch=epoch), body) for op, epoch, body in specs]
    stream = b"".join(f.encode() for f in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for chunk in _chunks(stream, cuts):
        out += dec.feed(chunk)
    assert out == frames
    dec.eof()


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_payload_decoders_only_raise_typed_errors(data: bytes, opcode: int) -> None:
    with contextlib.suppress(ProtocolError):
        decode_payload(opcode, data)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.floats(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _schema_maps() -> st.SearchStrategy[tuple[int, bytes]]:
    import dataclasses

    import cbor2

    from kalandra_core.proto.payloads import MLS_WRAPPERS, STRUCT_PAYLOADS

    types = sorted({**STRUCT_PAYLOADS, **MLS_WRAPPERS}.items())

    def build(item: tuple[int, type]) -> st.SearchStrategy[tuple[int, bytes]]:
        op, cls = item
        names = [f.name for f in dataclasses.fields(cls)]
        maps = st.dictionaries(st.sampled_from(names), cbor_values, max_size=len(names))
        return st.tuples(st.just(op), maps.map(cbor2.dumps))

    return st.sampled_from(types).flatmap(build)


@settings(max_examples=500)
@given(_schema_maps())
def test_well_formed_cbor_with_wrong_shapes_gives_typed_errors(item: tuple[int, bytes]) -> None:
    opcode, data = item
    with contextlib.suppress(ProtocolError):
        decode_payload(opcode, data)
