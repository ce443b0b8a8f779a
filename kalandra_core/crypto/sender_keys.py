"""Per-sender seeds derived from the MLS epoch (docs/wire-protocol.md, Sender seeds).

    epoch_secret = MLS-Exporter("kalandra sender keys v1", "", 32)
    seed_i       = HKDF-SHA256(salt=none, ikm=epoch_secret,
                               info="kalandraSenderV1" || epoch u64 BE || i u32 BE, L=32)

Every member derives every sender's seed, so any member (the bridge included) can decrypt any
sender and encrypt as the leaves it holds.
"""

from __future__ import annotations

import struct
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

EXPORTER_LABEL: Final = "kalandra sender keys v1"
EXPORTER_LENGTH: Final = 32
HKDF_INFO_PREFIX: Final = b"kalandraSenderV1"
SEED_SIZE: Final = 32

_INFO_SUFFIX = struct.Struct(">QI")


def derive_sender_seed(epoch_secret: bytes, epoch: int, sender_index: int) -> bytes:
    """The 32-byte chain seed of leaf ``sender_index`` in ``epoch``."""
    info = HKDF_INFO_PREFIX + _INFO_SUFFIX.pack(epoch, sender_index)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_SIZE, salt=None, info=info).derive(
        bytes(epoch_secret)
    )
