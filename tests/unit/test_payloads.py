"""CBOR payload rules: field order, byte arrays, optional fields, leniency on input, errors."""

from __future__ import annotations

import cbor2
import pytest

from kalandra_core.proto import (
    Ban,
    CommitData,
    Empty,
    EncryptedMessage,
    ErrorCode,
    ErrorPayload,
    Hello,
    KeyPackageData,
    Opcode,
    PayloadDecodeError,
    PayloadEncodeError,
    ProposalData,
    ProposalType,
    PushKey,
    RawPayload,
    Receipt,
    ReceiptKind,
    SyncRequest,
    SyncResponse,
    UnsupportedOpcode,
    WelcomeData,
    decode_payload,
    payload_from_json,
)


def test_keys_follow_declaration_order_not_sorted_order() -> None:
    msg = EncryptedMessage(
        epoch=1, sender_index=2, generation=3, nonce=bytes(24), ciphertext=b"\x01"
    )
    assert list(cbor2.loads(msg.encode())) == [
        "epoch",
        "sender_index",
        "generation",
        "nonce",
        "ciphertext",
    ]


def test_bytes_are_arrays_of_uints_on_output() -> None:
    data = Hello(auth_token=bytes([0xDE, 0x00, 0x17, 0x18])).encode()
    # 0x84: array(4); 0x18de: uint 222; 0x00; 0x17 inline; 0x1818: uint 24
    assert data.endswith(bytes.fromhex("6a617574685f746f6b656e8418de00171818"))


def test_byte_strings_are_accepted_on_input() -> None:
    wire = cbor2.dumps({"key_package_bytes": b"\x01\x02"})
    assert decode_payload(Opcode.KEY_PACKAGE, wire) == KeyPackageData(
        key_package_bytes=b"\x01\x02"
    )
    nonce_as_bstr = cbor2.dumps(
        {"epoch": 1, "sender_index": 0, "generation": 0, "nonce": bytes(24), "ciphertext": b"x"}
    )
    assert EncryptedMessage.decode(nonce_as_bstr).ciphertext == b"x"


def test_optional_fields_are_omitted_and_null_means_absent() -> None:
    assert cbor2.loads(Ban(user_id=1, reason="r", moderator_id=2).encode()) == {
        "user_id": 1,
        "reason": "r",
        "moderator_id": 2,
    }
    with_null = cbor2.dumps(
        {"user_id": 1, "reason": "r", "duration_secs": None, "moderator_id": 2}
    )
    assert Ban.decode(with_null).duration_secs is None


def test_error_payload_extension_fields_round_trip_and_reference_shape_is_unchanged() -> None:
    plain = ErrorPayload(code=0x0105, message="stale")
    assert list(cbor2.loads(plain.encode())) == ["code", "message"]
    stale = ErrorPayload(
        code=ErrorCode.STALE_EPOCH, message="stale", current_epoch=9, log_index=77
    )
    back = ErrorPayload.decode(stale.encode())
    assert back == stale
    assert back.error_code is ErrorCode.STALE_EPOCH
    assert ErrorPayload(code=400, message="x").error_code is None


def test_unknown_keys_and_byte_string_keys_and_trailing_bytes() -> None:
    wire = cbor2.dumps({b"from_log_index": 5, "future_field": [1, 2], "limit": 7}) + b"\xff\xff"
    assert SyncRequest.decode(wire) == SyncRequest(from_log_index=5, limit=7)


def test_sync_limit_defaults_to_100() -> None:
    assert SyncRequest.decode(cbor2.dumps({"from_log_index": 3})).limit == 100


def test_unit_enums_are_text() -> None:
    r = Receipt(message_log_index=1, kind=ReceiptKind.DELIVERED, timestamp=5)
    assert cbor2.loads(r.encode())["kind"] == "Delivered"
    with pytest.raises(PayloadDecodeError, match="Delivered, Read"):
        Receipt.decode(cbor2.dumps({"message_log_index": 1, "kind": "Seen", "timestamp": 5}))
    p = ProposalData(proposal_bytes=b"", proposal_type=ProposalType.GROUP_CONTEXT_EXTENSIONS)
    assert ProposalData.decode(p.encode()) == p


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ({"reason": "r", "moderator_id": 1}, "user_id: missing field"),
        ({"user_id": -1, "reason": "r", "moderator_id": 1}, "unsigned 64-bit"),
        ({"user_id": 2**64, "reason": "r", "moderator_id": 1}, "unsigned 64-bit"),
        ({"user_id": True, "reason": "r", "moderator_id": 1}, "unsigned 64-bit"),
        ({"user_id": 1, "reason": 5, "moderator_id": 1}, "reason: expected text"),
        ({"user_id": 1, "reason": "r", "moderator_id": "1"}, "moderator_id"),
    ],
)
def test_decode_errors_name_the_field(wire: dict[str, object], message: str) -> None:
    with pytest.raises(PayloadDecodeError, match=message):
        Ban.decode(cbor2.dumps(wire))


def test_fixed_size_arrays_are_checked() -> None:
    bad = cbor2.dumps(
        {"commit_bytes": [], "new_epoch": 1, "tree_hash": [1] * 31, "is_external": False}
    )
    with pytest.raises(PayloadDecodeError, match="exactly 32 bytes"):
        CommitData.decode(bad)
    with pytest.raises(PayloadDecodeError, match=r"0\.\.255"):
        CommitData.decode(
            cbor2.dumps(
                {"commit_bytes": [256], "new_epoch": 1, "tree_hash": [0] * 32, "is_external": 0}
            )
        )
    with pytest.raises(PayloadEncodeError, match="exactly 24 bytes"):
        EncryptedMessage(epoch=0, sender_index=0, generation=0, nonce=b"", ciphertext=b"").encode()


def test_not_a_map_and_garbage_are_typed_errors() -> None:
    for data in (b"", b"\x01", b"\xff", b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x81" * 1000):
        with pytest.raises(PayloadDecodeError):
            Hello.decode(data)


def test_push_keys_nested_structs() -> None:
    msg = EncryptedMessage(
        epoch=3,
        sender_index=1,
        generation=9,
        nonce=bytes(range(24)),
        ciphertext=b"ct",
        push_keys=[PushKey(recipient_id=7, encrypted_key=bytes(80))],
    )
    back = EncryptedMessage.decode(msg.encode())
    assert back == msg
    assert back.push_keys is not None
    assert back.push_keys[0].encrypted_key == bytes(80)
    with pytest.raises(PayloadDecodeError, match=r"push_keys\[0\].*expected a map"):
        EncryptedMessage.decode(
            cbor2.dumps(
                {
                    "epoch": 1,
                    "sender_index": 0,
                    "generation": 0,
                    "nonce": [0] * 24,
                    "ciphertext": [],
                    "push_keys": [5],
                }
            )
        )


def test_sync_response_carries_whole_frames() -> None:
    resp = SyncResponse(frames=[b"\x01\x02", b""], has_more=True, server_epoch=4)
    raw = cbor2.loads(resp.encode())
    assert raw == {"frames": [[1, 2], []], "has_more": True, "server_epoch": 4}


def test_mls_opcodes_take_raw_tls_or_the_cbor_wrapper() -> None:
    raw_mls = bytes.fromhex("0001000200")  # MLSMessage starts with version 0x0001
    for op in (Opcode.COMMIT, Opcode.WELCOME, Opcode.PROPOSAL, Opcode.KEY_PACKAGE):
        assert decode_payload(op, raw_mls) == RawPayload(raw_mls)
    wrapped = WelcomeData(welcome_bytes=raw_mls, epoch=3)
    assert decode_payload(Opcode.WELCOME, wrapped.encode()) == wrapped


def test_ping_ignores_payload_and_schema_less_opcodes_are_unsupported() -> None:
    assert decode_payload(Opcode.PING, b"whatever") == Empty()
    with pytest.raises(UnsupportedOpcode):
        decode_payload(Opcode.TYPING, b"")
    with pytest.raises(UnsupportedOpcode):
        decode_payload(0x7777, b"")


def test_json_form_round_trips() -> None:
    msg = EncryptedMessage(epoch=1, sender_index=2, generation=3, nonce=bytes(24), ciphertext=b"z")
    js = msg.to_json()
    assert js["nonce"] == "00" * 24
    assert payload_from_json(Opcode.APP_MESSAGE, js) == msg
    assert payload_from_json(Opcode.COMMIT, "0001") == RawPayload(b"\x00\x01")
    with pytest.raises(PayloadDecodeError, match="hex"):
        payload_from_json(Opcode.APP_MESSAGE, {**js, "nonce": "zz"})
