"""Ratchet, envelope, PCEK, sealed state and the SenderKeyStore."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kalandra_core.crypto import (
    MAX_SKIP,
    DecryptionFailed,
    EpochMismatch,
    GenerationOverflow,
    InvalidKeyLength,
    RatchetTooFarBehind,
    ReplayedMessage,
    SenderKeyStore,
    SymmetricRatchet,
    UnknownSender,
    envelope,
    pcek,
    sealed,
)
from kalandra_core.crypto.ratchet import MAX_SKIPPED_KEYS
from kalandra_core.proto import EncryptedMessage

SEED = bytes(range(32))


# --- ratchet ---------------------------------------------------------------------------------


def test_out_of_order_keys_match_in_order_keys() -> None:
    in_order = SymmetricRatchet(SEED)
    keys = [in_order.next_key()[1] for _ in range(10)]
    r = SymmetricRatchet(SEED)
    for g in (3, 0, 9, 1, 2, 8, 4, 5, 7, 6):
        assert r.message_key(g) == keys[g]


def test_each_key_is_usable_once() -> None:
    r = SymmetricRatchet(SEED)
    r.message_key(5)
    with pytest.raises(ReplayedMessage):
        r.message_key(5)
    r.message_key(2)  # skipped key, still there once
    with pytest.raises(ReplayedMessage):
        r.message_key(2)


def test_skip_window_is_1000() -> None:
    r = SymmetricRatchet(SEED)
    with pytest.raises(RatchetTooFarBehind):
        r.message_key(MAX_SKIP + 1)
    r.message_key(MAX_SKIP)  # exactly 1000 ahead is allowed


def test_skipped_store_is_bounded_and_forgets_the_oldest() -> None:
    r = SymmetricRatchet(SEED)
    r.message_key(MAX_SKIP)  # keeps 1000 skipped keys (0..999)
    r.message_key(MAX_SKIP + 10)  # 10 more skipped: the 10 oldest are evicted
    assert len(r._skipped) == MAX_SKIPPED_KEYS
    with pytest.raises(RatchetTooFarBehind, match="expired"):
        r.message_key(0)
    r.message_key(10)  # the oldest key still held


def test_lookup_does_not_consume_until_commit() -> None:
    r = SymmetricRatchet(SEED)
    found = r.lookup(3)
    assert r.generation == 0
    assert r.lookup(3).key == found.key
    r.commit(found)
    assert r.generation == 4


def test_ratchet_state_round_trip() -> None:
    r = SymmetricRatchet(SEED)
    r.message_key(4)
    back = SymmetricRatchet.from_state(r.to_state())
    assert back.message_key(2) == SymmetricRatchet(SEED).message_key(2)
    with pytest.raises(ReplayedMessage):
        back.message_key(4)


def test_bad_seed_and_generation_overflow() -> None:
    with pytest.raises(InvalidKeyLength):
        SymmetricRatchet(b"short")
    r = SymmetricRatchet(SEED, generation=0xFFFFFFFF)
    with pytest.raises(GenerationOverflow):
        r.next_key()


# --- envelope --------------------------------------------------------------------------------


def _message(key: bytes = SEED) -> EncryptedMessage:
    return envelope.encrypt(key, b"hello", epoch=3, sender_index=1, generation=7)


def test_envelope_round_trip_and_fresh_nonces() -> None:
    a, b = _message(), _message()
    assert a.nonce[:16] == b.nonce[:16]
    assert a.nonce != b.nonce
    assert envelope.decrypt(SEED, a) == b"hello"
    assert len(a.ciphertext) == 5 + 16


@pytest.mark.parametrize(
    "change",
    [
        {"ciphertext": b"\x00" * 21},
        {"generation": 8},
        {"epoch": 4},
        {"sender_index": 2},
        {"ciphertext": b"short"},
    ],
)
def test_envelope_rejects_tampering(change: dict[str, object]) -> None:
    msg = dataclasses.replace(_message(), **change)  # type: ignore[arg-type]
    with pytest.raises(DecryptionFailed):
        envelope.decrypt(SEED, msg)


def test_envelope_rejects_wrong_key() -> None:
    with pytest.raises(DecryptionFailed, match="authentication"):
        envelope.decrypt(bytes(32), _message())
    with pytest.raises(InvalidKeyLength):
        envelope.decrypt(b"k", _message())


# --- PCEK ------------------------------------------------------------------------------------


def test_pcek_layout_and_independent_open() -> None:
    device = X25519PrivateKey.generate()
    device_pub = device.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    message_key = os.urandom(32)
    blob = pcek.seal(device_pub, message_key)
    assert len(blob) == 80
    # Open it from the layout alone: eph_pk(32) || ct(32) || tag(16), HKDF "PCEKv1", zero nonce.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    shared = device.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"PCEKv1").derive(shared)
    assert ChaCha20Poly1305(k).decrypt(bytes(12), blob[32:], None) == message_key
    device_priv = device.private_bytes_raw()
    assert pcek.open(device_priv, blob) == message_key


def test_pcek_rejects_wrong_size_and_wrong_device() -> None:
    device = X25519PrivateKey.generate()
    blob = pcek.seal(device.public_key().public_bytes_raw(), bytes(32))
    for bad in (blob[:79], blob + b"\x00", b""):
        with pytest.raises(DecryptionFailed, match="80 bytes"):
            pcek.open(device.private_bytes_raw(), bad)
    with pytest.raises(DecryptionFailed):
        pcek.open(X25519PrivateKey.generate().private_bytes_raw(), blob)


# --- sealed state ----------------------------------------------------------------------------


def test_sealed_state() -> None:
    key = os.urandom(32)
    blob = sealed.seal(key, "mls-group", b"secret state")
    assert b"secret state" not in blob
    assert sealed.unseal(key, "mls-group", blob) == b"secret state"
    with pytest.raises(DecryptionFailed):
        sealed.unseal(key, "sender-keys", blob)
    with pytest.raises(DecryptionFailed):
        sealed.unseal(os.urandom(32), "mls-group", blob)
    with pytest.raises(DecryptionFailed):
        sealed.unseal(key, "mls-group", blob[:-1] + bytes([blob[-1] ^ 1]))


# --- SenderKeyStore --------------------------------------------------------------------------

SECRET_1 = os.urandom(32)
SECRET_2 = os.urandom(32)


def _stores(n: int = 3) -> list[SenderKeyStore]:
    return [
        SenderKeyStore(epoch=1, epoch_secret=SECRET_1, own_index=i, member_indices=set(range(n)))
        for i in range(n)
    ]


def test_everyone_decrypts_everyone_including_own_echo() -> None:
    stores = _stores()
    for sender in stores:
        for n in range(3):
            msg = sender.encrypt(f"from {sender.own_index} #{n}".encode())
            assert msg.generation == n
            for receiver in stores:
                assert receiver.decrypt(msg) == f"from {sender.own_index} #{n}".encode()


def test_replay_is_rejected_and_failed_auth_consumes_nothing() -> None:
    a, b = _stores(2)
    msg = a.encrypt(b"once")
    forged = dataclasses.replace(msg, ciphertext=bytes(len(msg.ciphertext)))
    with pytest.raises(DecryptionFailed):
        b.decrypt(forged)
    assert b.decrypt(msg) == b"once"
    with pytest.raises(ReplayedMessage):
        b.decrypt(msg)


def test_unknown_sender_and_epoch_mismatch() -> None:
    a, b = _stores(2)
    with pytest.raises(UnknownSender):
        a.encrypt(b"x", sender_index=5)
    msg = a.encrypt(b"x")
    b.rekey(epoch=2, epoch_secret=SECRET_2, member_indices={0, 1})
    assert b.decrypt(msg) == b"x"  # previous epoch is still readable
    b.rekey(epoch=3, epoch_secret=os.urandom(32), member_indices={0, 1})
    with pytest.raises(EpochMismatch) as exc:
        b.decrypt(msg)
    assert (exc.value.expected, exc.value.actual) == (3, 1)


def test_removed_member_cannot_follow_new_epoch() -> None:
    a, b, c = _stores(3)
    for s in (a, b):
        s.rekey(epoch=2, epoch_secret=SECRET_2, member_indices={0, 1})
    msg = a.encrypt(b"after removal")
    assert b.decrypt(msg) == b"after removal"
    with pytest.raises(EpochMismatch):
        c.decrypt(msg)
    # Even with a forged epoch label, c's old secret yields the wrong key.
    c.rekey(epoch=2, epoch_secret=SECRET_1, member_indices={0, 1, 2})
    with pytest.raises(DecryptionFailed):
        c.decrypt(msg)


def test_store_persists_and_continues() -> None:
    a, b = _stores(2)
    first = a.encrypt(b"1")
    b.decrypt(first)
    a2 = SenderKeyStore.from_bytes(a.to_bytes())
    b2 = SenderKeyStore.from_bytes(b.to_bytes())
    second = a2.encrypt(b"2")
    assert second.generation == 1  # the send chain continued, no generation reuse
    assert b2.decrypt(second) == b"2"
    with pytest.raises(ReplayedMessage):
        b2.decrypt(first)
    assert b2.epoch == 1
    with pytest.raises(ValueError, match="epoch must increase"):
        b2.rekey(epoch=1, epoch_secret=SECRET_1, member_indices={0})


def test_bridge_encrypts_as_puppet_leaves() -> None:
    bridge, native = _stores(2)
    bridge.rekey(epoch=2, epoch_secret=SECRET_2, member_indices={0, 1, 2, 3})
    native.rekey(epoch=2, epoch_secret=SECRET_2, member_indices={0, 1, 2, 3})
    for puppet in (2, 3):
        msg = bridge.encrypt(b"from a Matrix user", sender_index=puppet)
        assert msg.sender_index == puppet
        assert native.decrypt(msg) == b"from a Matrix user"


def test_a_restored_state_never_reuses_a_generation_seen_in_the_log() -> None:
    a, b = _stores(2)
    snapshot = a.to_bytes()  # saved, then two messages sent before a crash
    sent = [a.encrypt(b"1"), a.encrypt(b"2")]
    restored = SenderKeyStore.from_bytes(snapshot)
    assert restored.send_generation(0) == 0
    for message in sent:  # the restored state reads its own messages back from the log
        restored.decrypt(message)
    assert restored.encrypt(b"after").generation == 2
    assert b.decrypt(sent[0]) == b"1"
    assert 0 not in b._current.send  # another member's leaf: b grows no send chain for it


def test_a_restored_bridge_never_reuses_a_puppet_generation_seen_in_the_log() -> None:
    bridge, native, _ = _stores(3)
    assert bridge.send_generation(2) == 0  # the bridge sends as leaf 2 (a puppet) in this epoch
    snapshot = bridge.to_bytes()
    sent = [bridge.encrypt(b"1", sender_index=2), bridge.encrypt(b"2", sender_index=2)]
    restored = SenderKeyStore.from_bytes(snapshot)
    for message in sent:
        restored.decrypt(message)
    assert restored.encrypt(b"after", sender_index=2).generation == 2
    assert native.decrypt(sent[1]) == b"2"
