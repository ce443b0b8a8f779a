"""encode∘decode is the identity for every payload type, and for whole frames."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kalandra_core.proto import Frame, FrameHeader, RawPayload, decode_payload
from kalandra_core.proto.payloads import MLS_WRAPPERS, STRUCT_PAYLOADS, Payload
from kalandra_core.proto.schema import (
    Bool,
    Bytes,
    CborStruct,
    Codec,
    ListOf,
    Nested,
    Text,
    UInt,
    UnitEnum,
)

ALL_TYPES: dict[int, type[CborStruct]] = {**STRUCT_PAYLOADS, **MLS_WRAPPERS}


def codec_strategy(codec: Codec) -> st.SearchStrategy[Any]:
    if isinstance(codec, UInt):
        return st.integers(0, (1 << codec.bits) - 1)
    if isinstance(codec, Text):
        return st.text(max_size=40)
    if isinstance(codec, Bool):
        return st.booleans()
    if isinstance(codec, Bytes):
        if codec.size is not None:
            return st.binary(min_size=codec.size, max_size=codec.size)
        return st.binary(max_size=300)
    if isinstance(codec, ListOf):
        return st.lists(codec_strategy(codec.item), max_size=4)
    if isinstance(codec, UnitEnum):
        return st.sampled_from(list(codec.enum_type))
    if isinstance(codec, Nested):
        return struct_strategy(codec.struct_type)
    raise AssertionError(f"no strategy for {codec!r}")


def struct_strategy(cls: type[CborStruct]) -> st.SearchStrategy[Any]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        s = codec_strategy(f.metadata["codec"])
        fields[f.name] = st.none() | s if f.metadata["optional"] else s
    return st.builds(cls, **fields)


payloads = st.sampled_from(sorted(ALL_TYPES.items())).flatmap(
    lambda item: st.tuples(st.just(item[0]), struct_strategy(item[1]))
)


@settings(max_examples=400)
@given(payloads)
def test_every_payload_type_round_trips(item: tuple[int, Payload]) -> None:
    opcode, payload = item
    data = payload.encode()
    assert decode_payload(opcode, data) == payload
    assert type(payload).decode(data) == payload  # type: ignore[attr-defined]
    # The JSON form is lossless too.
    assert type(payload).from_json(payload.to_json()) == payload  # type: ignore[attr-defined]


def test_strategies_cover_every_payload_type() -> None:
    assert len(ALL_TYPES) == 22  # with the four CAS (media block) payloads


headers = st.builds(
    FrameHeader,
    st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFF),
    request_id=st.integers(0, 2**32 - 1),
    room_id=st.integers(0, 2**128 - 1),
    sender_id=st.integers(0, 2**64 - 1),
    context_id=st.integers(0, 2**64 - 1),
    hlc_timestamp=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 2**64 - 1),
    signature=st.binary(min_size=64, max_size=64),
)


@given(headers, st.binary(max_size=2000))
def test_frames_round_trip(header: FrameHeader, payload: bytes) -> None:
    frame = Frame.new(header, payload)
    raw = frame.encode()
    back = Frame.decode(raw)
    assert back == frame
    assert back.encode() == raw
    assert FrameHeader.parse(raw).signing_data() == raw[0:40] + raw[48:64]


@given(st.binary(min_size=1, max_size=200).filter(lambda b: not 0xA0 <= b[0] <= 0xBF))
def test_raw_mls_payloads_pass_through(data: bytes) -> None:
    assert decode_payload(0x1002, data) == RawPayload(data)
