"""Ed25519 frame signatures over ``header[0:40] || header[48:64]``.

The sender signs after ``payload_size`` is final; ``context_id`` (bytes 40..47) is left out so the
sequencer can write the log index without breaking the signature. The payload is not covered:
application payloads are authenticated by their own AEAD, and MLS messages by MLS.
"""

from __future__ import annotations

import threading

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .frame import Frame
from .header import FrameHeader


def sign_header(header: FrameHeader, key: SigningKey) -> None:
    """Write the signature of ``header`` into it, in place."""
    header.signature = key.sign(header.signing_data()).signature


def sign_frame(frame: Frame, key: SigningKey) -> Frame:
    """Sign ``frame`` in place (its payload_size must already match the payload) and return it."""
    if frame.header.payload_size != len(frame.payload):
        raise ValueError("payload_size does not match the payload: build the frame with Frame.new")
    sign_header(frame.header, key)
    return frame


# Signatures this process verified lately, as key || signature || signed bytes (152 bytes
# each): the same frame is checked by the server when it arrives and again by every client of
# the process it reaches (the bridge's bot and its users' devices, all in the bridge's process,
# on its event loop). Only a check that passed is remembered, and a hit is the whole triple,
# byte for byte: the answer of a pure function, asked again. Verify threads share it.
_VERIFIED_KEPT = 8192
_verified: dict[bytes, None] = {}
_verified_lock = threading.Lock()


def verify_header(header: FrameHeader, public_key: bytes | VerifyKey) -> bool:
    """True iff the header carries a valid signature by ``public_key`` (32 raw bytes)."""
    try:
        key = public_key if isinstance(public_key, VerifyKey) else VerifyKey(bytes(public_key))
        data = header.signing_data()
        signature = header.signature
        checked = key.encode() + signature + data
        if checked in _verified:
            return True
        key.verify(data, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    with _verified_lock:
        _verified[checked] = None
        if len(_verified) > _VERIFIED_KEPT:
            del _verified[next(iter(_verified))]  # the oldest
    return True
