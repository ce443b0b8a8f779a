"""PCEK push keys: one message key sealed to one device's X25519 notification key.

Blob (80 bytes) = ephemeral X25519 public key (32) || ChaCha20-Poly1305 ciphertext of the 32-byte
message key (32) || tag (16), under k = HKDF-SHA256(salt=none, ikm=X25519(eph, recipient),
info="PCEKv1", L=32) with a zero nonce (safe: every k is fresh) and no associated data. A
notification service holding the device key can decrypt one message without the MLS tree.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import DecryptionFailed, InvalidKeyLength

BLOB_SIZE: Final = 80
HKDF_INFO: Final = b"PCEKv1"
_ZERO_NONCE: Final = bytes(12)


def _kdf(shared_secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(
        shared_secret
    )


def seal(recipient_public_key: bytes, message_key: bytes) -> bytes:
    if len(recipient_public_key) != 32:
        raise InvalidKeyLength("recipient notification key must be 32 bytes")
    if len(message_key) != 32:
        raise InvalidKeyLength("message key must be 32 bytes")
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public_key))
    sealed = ChaCha20Poly1305(_kdf(shared)).encrypt(_ZERO_NONCE, message_key, None)
    return ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) + sealed


def open(private_key: bytes, blob: bytes) -> bytes:
    """Recover the message key; anything but an 80-byte blob is rejected."""
    if len(blob) != BLOB_SIZE:
        raise DecryptionFailed(f"push key blob must be {BLOB_SIZE} bytes, got {len(blob)}")
    if len(private_key) != 32:
        raise InvalidKeyLength("notification private key must be 32 bytes")
    ephemeral_public = X25519PublicKey.from_public_bytes(blob[:32])
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(ephemeral_public)
        return ChaCha20Poly1305(_kdf(shared)).decrypt(_ZERO_NONCE, blob[32:], None)
    except (InvalidTag, ValueError):
        raise DecryptionFailed("push key authentication failed") from None
