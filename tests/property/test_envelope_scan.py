"""The sequencer's byte-level envelope check never accepts what the decoder refuses."""

from __future__ import annotations

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from kalandra_core.proto import Opcode, PayloadDecodeError, check_payload, decode_payload
from kalandra_core.proto.envelope_scan import usual_envelope
from kalandra_core.proto.payloads import EncryptedMessage

envelopes = st.builds(
    EncryptedMessage,
    epoch=st.integers(0, (1 << 64) - 1),
    sender_index=st.integers(0, (1 << 32) - 1),
    generation=st.integers(0, (1 << 32) - 1),
    nonce=st.binary(min_size=24, max_size=24),
    ciphertext=st.binary(max_size=600),
)


def _decodes(data: bytes) -> bool:
    try:
        decode_payload(Opcode.APP_MESSAGE, data)
    except PayloadDecodeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_usual_layout_is_recognised(msg: EncryptedMessage) -> None:
    data = msg.encode()
    assert usual_envelope(data)
    assert usual_envelope(memoryview(data))
    assert EncryptedMessage.decode(data) == msg


@settings(max_examples=1500, deadline=None)
@given(
    envelopes,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    st.integers(0, 10_000),
    st.binary(max_size=3),
)
def test_accepted_only_if_decodable(
    msg: EncryptedMessage, edits: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    data = bytearray(msg.encode())
    for at, value in edits:
        data[at % len(data)] = value
    data = data[: max(1, len(data) - cut % 8)] + tail
    if usual_envelope(bytes(data)):
        assert _decodes(bytes(data))
    # check_payload still answers exactly as the decoder does
    try:
        check_payload(Opcode.APP_MESSAGE, bytes(data))
    except PayloadDecodeError:
        assert not _decodes(bytes(data))
    else:
        assert _decodes(bytes(data))


def test_other_layouts_fall_back() -> None:
    msg = EncryptedMessage(epoch=1, sender_index=2, generation=3, nonce=bytes(24), ciphertext=b"z")
    wire = msg.to_wire()
    reordered = cbor2.dumps(dict(reversed(list(wire.items()))))
    as_bstr = cbor2.dumps({**wire, "nonce": bytes(24), "ciphertext": b"z"})
    for data in (reordered, as_bstr, msg.encode() + b"\x00"):
        assert not usual_envelope(data)
        check_payload(Opcode.APP_MESSAGE, data)  # still accepted, by the decoder


_HEAD = bytes.fromhex("a5") + b"".join(
    cbor2.dumps(key) + cbor2.dumps(value)
    for key, value in (("epoch", 1), ("sender_index", 2), ("generation", 3))
)
_NONCE = cbor2.dumps("nonce") + cbor2.dumps(list(range(24)))
tokens = st.one_of(
    st.integers(0, 0x17).map(lambda b: bytes([b])),  # an element in one byte
    st.integers(0, 255).map(lambda b: bytes([0x18, b])),  # after 0x18, minimal or not
    st.integers(0x18, 0xFF).map(lambda b: bytes([b])),  # a stray large byte
    st.binary(min_size=1, max_size=3).map(lambda b: b"\x19" + b),  # wider arguments
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(tokens, max_size=40), st.integers(-2, 2))
def test_element_streams(stream: list[bytes], miscount: int) -> None:
    """Hand-made ciphertext element streams: accepted only if they decode, and always when
    they are minimal and the array's count is right."""
    count = max(0, len(stream) + miscount)
    data = _HEAD + _NONCE + cbor2.dumps("ciphertext")
    data += cbor2.dumps([0] * count)[: -count or None] + b"".join(stream)
    minimal = all(
        t[0] < 0x18 if len(t) == 1 else len(t) == 2 and t[0] == 0x18 and t[1] >= 0x18
        for t in stream
    )
    if usual_envelope(data):
        assert _decodes(data)
    if minimal and count == len(stream):
        assert usual_envelope(data)
