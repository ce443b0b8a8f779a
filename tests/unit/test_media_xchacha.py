"""The media cipher through OpenSSL makes the same bytes as libsodium's XChaCha20-Poly1305
(IETF), so blobs stored before and after read the same, and refuses what does not
authenticate."""

from __future__ import annotations

import os

import pytest
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from kalandra_core.media.xchacha import AuthenticationError, XChaCha20Poly1305, hchacha20


def test_hchacha20_matches_the_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, section 2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert hchacha20(key, nonce).hex() == expected


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 4096, 256 * 1024])
def test_same_bytes_as_libsodium_both_ways(size: int) -> None:
    key, nonce, ad = os.urandom(32), os.urandom(24), os.urandom(17)
    plain = os.urandom(size)
    aead = XChaCha20Poly1305(key)
    ours = aead.encrypt(nonce, plain, ad)
    assert ours == crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key)
    assert crypto_aead_xchacha20poly1305_ietf_decrypt(ours, ad, nonce, key) == plain
    assert aead.decrypt(nonce, ours, ad) == plain


def test_nonces_with_another_prefix_get_their_own_subkey() -> None:
    key = os.urandom(32)
    aead = XChaCha20Poly1305(key)
    for _ in range(3):
        nonce = os.urandom(24)
        expected = crypto_aead_xchacha20poly1305_ietf_encrypt(b"block", b"", nonce, key)
        assert aead.encrypt(nonce, b"block", b"") == expected


def test_tampered_ciphertext_wrong_ad_or_key_fail() -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    sealed = XChaCha20Poly1305(key).encrypt(nonce, b"content", b"ad")
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(AuthenticationError):
        XChaCha20Poly1305(key).decrypt(nonce, flipped, b"ad")
    with pytest.raises(AuthenticationError):
        XChaCha20Poly1305(key).decrypt(nonce, sealed, b"other")
    with pytest.raises(AuthenticationError):
        XChaCha20Poly1305(os.urandom(32)).decrypt(nonce, sealed, b"ad")
    with pytest.raises(ValueError, match="32 bytes"):
        XChaCha20Poly1305(b"short")
