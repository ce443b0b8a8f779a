"""The AppMessage envelope: XChaCha20-Poly1305 under a sender-key message key.

See docs/wire-protocol.md, Envelope.

Nonce (24 bytes) = epoch u64 BE || sender_index u32 BE || generation u32 BE || 8 random bytes.
No associated data, as the reference. On receipt we also check that the nonce's first 16 bytes
match the envelope's epoch, sender index and generation: reference senders always build it that
way, and the check stops a relabelled envelope from reaching the AEAD with a mismatched key.
"""

from __future__ import annotations

import os
import struct
from typing import Final

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from ..proto.payloads import EncryptedMessage, PushKey
from .errors import DecryptionFailed, InvalidKeyLength

NONCE_SIZE: Final = 24
NONCE_RANDOM_SIZE: Final = 8
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32

_NONCE_PREFIX = struct.Struct(">QII")


def build_nonce(epoch: int, sender_index: int, generation: int, random8: bytes) -> bytes:
    if len(random8) != NONCE_RANDOM_SIZE:
        raise ValueError(f"nonce random part must be {NONCE_RANDOM_SIZE} bytes")
    return _NONCE_PREFIX.pack(epoch, sender_index, generation) + random8


def encrypt(
    key: bytes,
    plaintext: bytes,
    *,
    epoch: int,
    sender_index: int,
    generation: int,
    random8: bytes | None = None,
    push_keys: list[PushKey] | None = None,
) -> EncryptedMessage:
    """Seal ``plaintext``; ``random8`` defaults to fresh OS randomness."""
    if len(key) != KEY_SIZE:
        raise InvalidKeyLength(f"message key must be {KEY_SIZE} bytes, got {len(key)}")
    nonce = build_nonce(
        epoch,
        sender_index,
        generation,
        os.urandom(NONCE_RANDOM_SIZE) if random8 is None else random8,
    )
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plaintext), None, nonce, key)
    return EncryptedMessage(
        epoch=epoch,
        sender_index=sender_index,
        generation=generation,
        nonce=nonce,
        ciphertext=ciphertext,
        push_keys=push_keys,
    )


def decrypt(key: bytes, message: EncryptedMessage) -> bytes:
    """Open ``message`` with the message key of its (epoch, sender_index, generation)."""
    if len(key) != KEY_SIZE:
        raise InvalidKeyLength(f"message key must be {KEY_SIZE} bytes, got {len(key)}")
    prefix = _NONCE_PREFIX.pack(message.epoch, message.sender_index, message.generation)
    if message.nonce[:16] != prefix:
        raise DecryptionFailed("nonce does not match the envelope's epoch/sender/generation")
    if len(message.ciphertext) < TAG_SIZE:
        raise DecryptionFailed("ciphertext shorter than the authentication tag")
    try:
        return bytes(
            crypto_aead_xchacha20poly1305_ietf_decrypt(
                message.ciphertext, None, message.nonce, key
            )
        )
    except CryptoError:
        raise DecryptionFailed("authentication failed") from None
