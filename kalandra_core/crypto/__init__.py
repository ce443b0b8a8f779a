"""Data-plane cryptography: sender keys derived from each MLS epoch, the per-sender symmetric
ratchet, the XChaCha20-Poly1305 message envelope, PCEK push keys and at-rest sealing.

Byte-compatible with the reference (kalandra 0879b7f; docs/wire-protocol.md, Sender keys); where
the reference is weaker we are stricter in ways that stay compatible on the wire (skipped-key
store, replay rejection, nonce layout checked on receipt, separate send and receive chains).
"""

from .errors import (
    DecryptionFailed,
    EpochMismatch,
    GenerationOverflow,
    InvalidKeyLength,
    RatchetTooFarBehind,
    ReplayedMessage,
    SenderKeyError,
    UnknownSender,
)
from .ratchet import MAX_SKIP, SymmetricRatchet
from .sender_keys import EXPORTER_LABEL, EXPORTER_LENGTH, derive_sender_seed
from .store import SenderKeyStore

__all__ = [
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "MAX_SKIP",
    "DecryptionFailed",
    "EpochMismatch",
    "GenerationOverflow",
    "InvalidKeyLength",
    "RatchetTooFarBehind",
    "ReplayedMessage",
    "SenderKeyError",
    "SenderKeyStore",
    "SymmetricRatchet",
    "UnknownSender",
    "derive_sender_seed",
]
