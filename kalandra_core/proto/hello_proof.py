"""The Hello proof: a device proves, at every Hello, that it holds its signing key.

A device token (or login code) alone must not open a session: the Hello carries ``proof``, the
Ed25519 signature by the offered ``signature_key`` over a domain-separated message that binds
the SHA-256 of the ``auth_token``, that key and the Hello header's HLC timestamp. The server
refuses a timestamp further than its clock skew allowance from its own clock, and remembers
every proof it accepted until that allowance has passed (``ReplayCache``), so a captured Hello
opens no second session. One round trip: nothing to wait for before sending Hello.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from typing import Final

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .hlc import LOGICAL_BITS
from .payloads import Hello

_DOMAIN: Final = b"kalandra/hello-proof/v1\x00"


def hello_proof_message(auth_token: bytes, signature_key: bytes, hlc_timestamp: int) -> bytes:
    return (
        _DOMAIN
        + hashlib.sha256(auth_token).digest()
        + bytes(signature_key)
        + struct.pack(">Q", hlc_timestamp)
    )


def sign_hello_proof(key: SigningKey, auth_token: bytes, hlc_timestamp: int) -> bytes:
    message = hello_proof_message(auth_token, bytes(key.verify_key), hlc_timestamp)
    return key.sign(message).signature


def signed_hello(auth_token: bytes, key: SigningKey, hlc_timestamp: int) -> Hello:
    """The Hello payload for a header stamped ``hlc_timestamp``, with its proof."""
    return Hello(
        auth_token=auth_token,
        signature_key=bytes(key.verify_key),
        proof=sign_hello_proof(key, auth_token, hlc_timestamp),
    )


def verify_hello_proof(
    signature_key: bytes, auth_token: bytes, hlc_timestamp: int, proof: bytes
) -> bool:
    try:
        VerifyKey(bytes(signature_key)).verify(
            hello_proof_message(auth_token, signature_key, hlc_timestamp), proof
        )
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class ReplayCache:
    """Hellos already accepted, each kept until its timestamp leaves the skew window (after
    that the timestamp check refuses it anyway). Bounded by the logins of one window."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, hlc_timestamp: int, now_ms: int) -> bool:
        """True if the timestamp's wall-clock part is within the window of ``now_ms``."""
        return abs((hlc_timestamp >> LOGICAL_BITS) - now_ms) <= self.window_ms

    def first_use(
        self, auth_token: bytes, signature_key: bytes, hlc_timestamp: int, now_ms: int
    ) -> bool:
        """Record the signed message (not the signature, whatever its encoding); False if it
        was seen already. Synchronous: two sessions racing with one Hello cannot both pass."""
        while self._expiry and self._expiry[0][0] < now_ms:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        message = hello_proof_message(auth_token, signature_key, hlc_timestamp)
        key = hashlib.sha256(message).digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        heapq.heappush(self._expiry, ((hlc_timestamp >> LOGICAL_BITS) + self.window_ms, key))
        return True
