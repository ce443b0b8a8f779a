"""Secrets at rest (MLS group state, ratchet state): XChaCha20-Poly1305 under a caller key.

Blob = version byte || 24-byte random nonce || ciphertext+tag. The ``purpose`` string is the
associated data, so a blob sealed as one kind of state cannot be opened as another.
"""

from __future__ import annotations

import os
from typing import Final

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .errors import DecryptionFailed, InvalidKeyLength

VERSION: Final = 1
_NONCE_SIZE: Final = 24


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise InvalidKeyLength(f"state key must be 32 bytes, got {len(key)}")


def seal(key: bytes, purpose: str, data: bytes) -> bytes:
    _check_key(key)
    nonce = os.urandom(_NONCE_SIZE)
    aad = bytes([VERSION]) + purpose.encode()
    return (
        bytes([VERSION])
        + nonce
        + crypto_aead_xchacha20poly1305_ietf_encrypt(data, aad, nonce, key)
    )


def unseal(key: bytes, purpose: str, blob: bytes) -> bytes:
    _check_key(key)
    if len(blob) < 1 + _NONCE_SIZE + 16 or blob[0] != VERSION:
        raise DecryptionFailed("not a sealed state blob (or an unknown version)")
    nonce = blob[1 : 1 + _NONCE_SIZE]
    aad = bytes([VERSION]) + purpose.encode()
    try:
        return bytes(
            crypto_aead_xchacha20poly1305_ietf_decrypt(blob[1 + _NONCE_SIZE :], aad, nonce, key)
        )
    except CryptoError:
        raise DecryptionFailed("wrong key, wrong purpose, or tampered state") from None
