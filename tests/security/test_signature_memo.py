"""The process's memory of verified frame signatures (proto/signing.py) against forgery: a
frame checked once is accepted again without a second Ed25519 check only if key, signature and
signed bytes are all the very ones that passed. Whatever an attacker varies, a tampered copy of
a verified frame, the same frame claimed for another key, a signature moved to other bytes, is
checked for real and refused; failures are never remembered; the memory stays bounded."""

from __future__ import annotations

import os

import pytest
from nacl.signing import SigningKey, VerifyKey

from kalandra_core.proto import Frame, FrameHeader, Opcode, RawPayload, signing, verify_header


def signed(key: SigningKey, sender: int = 5, body: bytes = b"x") -> FrameHeader:
    header = FrameHeader(Opcode.APP_MESSAGE, request_id=9, room_id=7, sender_id=sender, epoch=1)
    frame = Frame.build(header, RawPayload(body))
    signing.sign_frame(frame, key)
    return frame.header


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The signed bytes of every real Ed25519 check (each one counted)."""
    checks: list[bytes] = []
    real = VerifyKey.verify

    def verify(self: VerifyKey, data: bytes, signature: bytes) -> bytes:
        checks.append(bytes(data))
        return real(self, data, signature)

    monkeypatch.setattr(VerifyKey, "verify", verify)
    return checks


def test_a_frame_verified_once_is_not_checked_again(counted: list[bytes]) -> None:
    key = SigningKey.generate()
    header = signed(key)
    assert verify_header(header, key.verify_key)
    assert verify_header(header.copy(), bytes(key.verify_key))
    header.context_id = 42  # the log index the sequencer writes: not signed
    assert verify_header(header, key.verify_key)
    assert len(counted) == 1


def test_a_tampered_copy_of_a_verified_frame_is_checked_and_refused(counted: list[bytes]) -> None:
    key = SigningKey.generate()
    header = signed(key)
    assert verify_header(header, key.verify_key)
    for field, value in (("epoch", 2), ("sender_id", 43), ("room_id", 8), ("request_id", 10)):
        tampered = header.copy()
        setattr(tampered, field, value)
        assert not verify_header(tampered, key.verify_key), field
    flipped = header.copy()
    flipped.signature = bytes([header.signature[0] ^ 1]) + header.signature[1:]
    assert not verify_header(flipped, key.verify_key)
    assert len(counted) == 6  # every variant checked for real
    # Refusals are not remembered: checked again, refused again.
    assert not verify_header(flipped, key.verify_key)
    assert len(counted) == 7


def test_a_verified_frame_claimed_for_another_key_is_refused(counted: list[bytes]) -> None:
    mine, other = SigningKey.generate(), SigningKey.generate()
    header = signed(mine)
    assert verify_header(header, mine.verify_key)
    assert not verify_header(header, other.verify_key)
    assert len(counted) == 2


def test_a_signature_moved_onto_other_signed_bytes_is_refused() -> None:
    key = SigningKey.generate()
    first, second = signed(key, sender=5), signed(key, sender=6)
    assert verify_header(first, key.verify_key)
    second.signature = first.signature
    assert not verify_header(second, key.verify_key)


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "_VERIFIED_KEPT", 50)
    monkeypatch.setattr(signing, "_verified", {})
    key = SigningKey.generate()
    headers = [signed(key, body=os.urandom(8), sender=n + 1) for n in range(120)]
    for header in headers:
        assert verify_header(header, key.verify_key)
    assert len(signing._verified) <= 50
