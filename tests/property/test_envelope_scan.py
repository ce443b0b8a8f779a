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
