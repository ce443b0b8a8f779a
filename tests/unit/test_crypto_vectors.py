"""Every sender-key, ratchet, XChaCha20 and nonce vector of the reference is reproduced."""

from __future__ import annotations

from typing import Any

import pytest
from wire_vectors import load_wire_vectors

from kalandra_core.crypto import SymmetricRatchet, derive_sender_seed, envelope
from kalandra_core.crypto.envelope import build_nonce

VECTORS = load_wire_vectors()
CRYPTO_KINDS = {"hkdf_sender_key_seed", "ratchet", "encrypt_message", "nonce"}
CRYPTO = [v for v in VECTORS if v["kind"] in CRYPTO_KINDS]


def test_all_crypto_vectors_are_present() -> None:
    kinds = [v["kind"] for v in CRYPTO]
    assert kinds.count("hkdf_sender_key_seed") == 9
    assert kinds.count("ratchet") == 1
    assert kinds.count("encrypt_message") == 2
    assert kinds.count("nonce") == 1


def _int(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


@pytest.mark.parametrize("vector", CRYPTO, ids=lambda v: v["name"])
def test_crypto_vector(vector: dict[str, Any]) -> None:
    inputs = vector["decoded"]["inputs"]
    output = vector["decoded"]["output"]
    kind = vector["kind"]
    if kind == "hkdf_sender_key_seed":
        seed = derive_sender_seed(
            bytes.fromhex(inputs["epoch_secret_hex"]), inputs["epoch"], inputs["sender_index"]
        )
        assert seed.hex() == output["seed_hex"] == vector["hex"]
    elif kind == "ratchet":
        ratchet = SymmetricRatchet(bytes.fromhex(inputs["seed_hex"]))
        for step in output["steps"]:
            generation, key = ratchet.next_key()
            assert generation == step["generation"]
            assert key.hex() == step["message_key_hex"]
        jump = SymmetricRatchet(bytes.fromhex(inputs["seed_hex"]))
        advance = output["advance_to_5"]
        assert jump.message_key(5).hex() == advance["message_key_hex"]
        assert jump.generation == advance["ratchet_generation_after"]
    elif kind == "encrypt_message":
        if "sender_key_seed_hex" in inputs:
            seed = derive_sender_seed(
                bytes.fromhex(inputs["epoch_secret_hex"]), inputs["epoch"], inputs["sender_index"]
            )
            assert seed.hex() == inputs["sender_key_seed_hex"]
            key = SymmetricRatchet(seed).message_key(inputs["generation"])
            assert key.hex() == inputs["message_key_hex"]
        else:
            key = bytes.fromhex(inputs["message_key_hex"])
        plaintext = inputs["plaintext_ascii"].encode()
        msg = envelope.encrypt(
            key,
            plaintext,
            epoch=inputs["epoch"],
            sender_index=inputs["sender_index"],
            generation=inputs["generation"],
            random8=bytes.fromhex(inputs["random_suffix_hex"]),
        )
        assert msg.nonce.hex() == output["nonce_hex"]
        assert msg.ciphertext.hex() == output["ciphertext_with_tag_hex"] == vector["hex"]
        assert envelope.decrypt(key, msg) == plaintext
    else:
        nonce = build_nonce(
            _int(inputs["epoch"]),
            _int(inputs["sender_index"]),
            _int(inputs["generation"]),
            bytes.fromhex(inputs["random_suffix_hex"]),
        )
        assert nonce.hex() == output["nonce_hex"] == vector["hex"]
