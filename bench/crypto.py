"""Message encryption and decryption through the SenderKeyStore (ratchet step + envelope).

The limit is raw libsodium XChaCha20-Poly1305 on the same plaintext, measured in the same run.
Target (docs/performance-targets.md): under 0.1 ms per message, i.e. more than 10,000
messages per second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from kalandra_core.crypto import SenderKeyStore
from kalandra_core.proto import EncryptedMessage

from .common import Figure, Results, rate


def run(quick: bool) -> Results:
    batch, repeats = (5_000, 5) if quick else (20_000, 15)
    figures: list[Figure] = []
    secret = os.urandom(32)
    key, nonce = os.urandom(32), os.urandom(24)
    for size in (100, 1024):
        plaintext = os.urandom(size)
        members = set(range(16))
        sender = SenderKeyStore(epoch=1, epoch_secret=secret, own_index=0, member_indices=members)
        # Messages are pre-encrypted for the decrypt run so it measures decryption alone.
        messages = iter([sender.encrypt(plaintext) for _ in range(batch * repeats)])
        receiver = SenderKeyStore(
            epoch=1, epoch_secret=secret, own_index=1, member_indices=members
        )
        writer = SenderKeyStore(epoch=1, epoch_secret=secret, own_index=2, member_indices=members)

        def raw(p: bytes = plaintext) -> bytes:
            return crypto_aead_xchacha20poly1305_ietf_encrypt(p, None, nonce, key)

        def decrypt(
            r: SenderKeyStore = receiver, m: Iterator[EncryptedMessage] = messages
        ) -> bytes:
            return r.decrypt(next(m))

        def encrypt(p: bytes = plaintext, w: SenderKeyStore = writer) -> object:
            return w.encrypt(p)

        limit = rate(raw, batch, repeats)
        decrypt_rate = rate(decrypt, batch, repeats)
        encrypt_rate = rate(encrypt, batch, repeats)
        name = f"raw XChaCha20 {size} B"
        figures += [
            Figure(f"encrypt {size} B message", encrypt_rate, "/s", "> 10,000 /s", name, limit),
            Figure(f"decrypt {size} B message", decrypt_rate, "/s", "> 10,000 /s", name, limit),
        ]
    return Results(figures)
