"""Every frame of the reference vectors decodes to its recorded fields and re-encodes exactly."""

from __future__ import annotations

from typing import Any

import pytest
from wire_vectors import load_wire_vectors

from kalandra_core.proto import Frame, FrameHeader, Opcode, verify_header

VECTORS = load_wire_vectors()
FRAME_VECTORS = [v for v in VECTORS if v["kind"] == "frame_snapshot"]
SIGNED = next(v for v in VECTORS if v["kind"] == "frame_signature")


def test_vector_file_has_all_reference_snapshots() -> None:
    # 21 snapshots from the reference; a shrunken file must not silently pass.
    assert len(FRAME_VECTORS) == 21


def _expected_header(v: dict[str, Any]) -> dict[str, Any]:
    return v["decoded"]["header"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=lambda v: v["name"])
def test_snapshot_decodes_and_reencodes(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    frame = Frame.decode(raw)
    want = _expected_header(vector)
    h = frame.header
    assert h.magic == int(want["magic"], 16)
    assert h.version == want["version"]
    assert int(h.flags) == want["flags"]
    assert h.opcode == want["opcode"]
    assert h.opcode_name == want["opcode_name"]
    assert h.request_id == want["request_id"]
    assert h.payload_size == want["payload_size"] == len(frame.payload)
    assert f"{h.room_id:032x}" == want["room_id_hex"]
    assert h.sender_id == want["sender_id"]
    assert h.context_id == want["context_id"]
    assert h.hlc_timestamp == want["hlc_timestamp"]
    assert h.epoch == want["epoch"]
    assert h.signature.hex() == want["signature_hex"]
    assert h.signing_data().hex() == want["signing_data_hex"]
    assert frame.payload.hex() == vector["decoded"]["payload_hex"]

    payload = frame.decode_payload()
    expected_payload = vector["decoded"]["payload"]
    if frame.header.opcode in (Opcode.PING, Opcode.PONG):
        assert expected_payload is None
        assert payload.encode() == b""
    else:
        # The vector records the CBOR data model: byte fields as lists of ints.
        assert payload.to_wire() == expected_payload  # type: ignore[attr-defined]

    # Re-encode from the typed payload and a header rebuilt from its fields.
    header = FrameHeader(
        h.opcode,
        flags=int(h.flags),
        request_id=h.request_id,
        room_id=h.room_id,
        sender_id=h.sender_id,
        context_id=h.context_id,
        hlc_timestamp=h.hlc_timestamp,
        epoch=h.epoch,
        signature=h.signature,
    )
    assert Frame.build(header, payload).encode() == raw
    assert frame.encode() == raw


def test_signed_vector_verifies_and_survives_context_rewrite() -> None:
    out = SIGNED["decoded"]["output"]
    inputs = SIGNED["decoded"]["inputs"]
    public_key = bytes.fromhex(inputs["ed25519_public_key_hex"])

    sent = Frame.decode(bytes.fromhex(out["frame_as_sent_by_client_hex"]))
    assert sent.header.signing_data().hex() == out["signing_data_hex"]
    assert sent.header.signature.hex() == out["signature_hex"]
    assert verify_header(sent.header, public_key)

    # The sequencer writes the log index into context_id; the signature must still hold.
    sequenced = Frame.decode(bytes.fromhex(SIGNED["hex"]))
    assert sequenced.header.context_id == 7
    assert verify_header(sequenced.header, public_key)
    sent.header.context_id = 7
    assert sent.encode() == bytes.fromhex(out["frame_after_sequencing_log_index_7_hex"])
    assert verify_header(sent.header, public_key)
    sent.header.context_id = 2**64 - 1
    assert verify_header(sent.header, public_key)

    # Any covered field changing breaks it.
    for field, value in (("epoch", 2), ("sender_id", 43), ("room_id", 0x1235), ("flags", 1)):
        tampered = sequenced.header.copy()
        setattr(tampered, field, value)
        assert not verify_header(tampered, public_key), field


def test_signed_vector_signature_is_reproduced_by_our_signer() -> None:
    from nacl.signing import SigningKey

    from kalandra_core.proto import EncryptedMessage, sign_frame

    inputs = SIGNED["decoded"]["inputs"]
    key = SigningKey(bytes.fromhex(inputs["ed25519_seed_hex"]))
    assert bytes(key.verify_key).hex() == inputs["ed25519_public_key_hex"]
    payload = EncryptedMessage.decode(bytes.fromhex(inputs["payload_cbor_hex"]))
    header = FrameHeader(
        Opcode.APP_MESSAGE,
        room_id=int(inputs["room_id_hex"], 16),
        sender_id=inputs["sender_id"],
        epoch=inputs["epoch"],
    )
    frame = sign_frame(Frame.build(header, payload), key)
    assert frame.encode().hex() == SIGNED["decoded"]["output"]["frame_as_sent_by_client_hex"]
