"""XChaCha20-Poly1305 (IETF) of media blocks through OpenSSL's ChaCha20-Poly1305.

The construction is the one libsodium's ``crypto_aead_xchacha20poly1305_ietf_*`` implements, so
the bytes are the same: HChaCha20 of the key and the first 16 bytes of the 24-byte nonce gives a
subkey, and ChaCha20-Poly1305 (RFC 8439) under that subkey takes four zero bytes and the last 8
bytes of the nonce as its 12-byte nonce. Every nonce of one blob shares its first 16 bytes, so
the subkey is derived once per blob (one ChaCha20 block through OpenSSL) and every
block then costs one OpenSSL call: quicker than libsodium's here, and without PyNaCl's extra
zeroed buffer and copy of each block.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

NONCE_SIZE: Final = 24
_MASK: Final = 0xFFFFFFFF
_ZERO_BLOCK: Final = bytes(64)
_SIGMA: Final = struct.unpack("<4I", b"expand 32-byte k")


class AuthenticationError(Exception):
    """A ciphertext did not authenticate under the key, nonce and associated data."""


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha): the subkey of ``key`` for a 16-byte nonce prefix.

    Computed with OpenSSL's ChaCha20 rather than rounds of our own: ChaCha20's first block
    (counter and nonce given as the state's last 16 bytes, here the prefix) is the permuted
    state plus the initial state, and HChaCha20 is the permuted state's words 0-3 and 12-15.
    Subtracting the initial words (the constant, and the prefix) gives them back."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor()
    block = struct.unpack("<16I", encryptor.update(_ZERO_BLOCK))
    initial = (*_SIGMA, *struct.unpack("<4I", nonce16))
    words = (*block[0:4], *block[12:16])
    return struct.pack("<8I", *((w - i) & _MASK for w, i in zip(words, initial, strict=True)))


class XChaCha20Poly1305:
    """One key's AEAD; the subkey of the last nonce prefix seen is kept."""

    __slots__ = ("_aead", "_key", "_prefix")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("an XChaCha20-Poly1305 key is 32 bytes")
        self._key = key
        self._prefix = b""
        self._aead: ChaCha20Poly1305 | None = None

    def _inner(self, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
        if len(nonce) != NONCE_SIZE:
            raise ValueError("an XChaCha20-Poly1305 nonce is 24 bytes")
        prefix = nonce[:16]
        if self._aead is None or prefix != self._prefix:
            self._aead = ChaCha20Poly1305(hchacha20(self._key, prefix))
            self._prefix = prefix
        return self._aead, b"\x00\x00\x00\x00" + nonce[16:]

    def encrypt(self, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        aead, inner = self._inner(nonce)
        return aead.encrypt(inner, plaintext, ad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        aead, inner = self._inner(nonce)
        try:
            return aead.decrypt(inner, ciphertext, ad)
        except InvalidTag:
            raise AuthenticationError("ciphertext fails authentication") from None
