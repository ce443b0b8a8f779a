"""A byte-level check of the usual AppMessage envelope, without decoding it.

Clients (serde through ciborium, or cbor2) write an EncryptedMessage as a map of five text keys
in field order, with ``nonce`` and ``ciphertext`` as arrays of small integers. Decoding that
builds a list of a few hundred ints per message; on the sequencer's path it was the largest
per-frame cost after the signature. :func:`usual_envelope` recognises exactly that layout with
one regular expression and a count, and says False for anything else (other key orders,
non-minimal element encodings, trailing bytes, push keys): the caller then decodes as before.
True is only ever said of bytes the full decoder accepts.
"""

from __future__ import annotations

import re
from typing import Final

# A CBOR unsigned integer below 2**32 (any argument width), and below 2**64.
_U32 = rb"(?:[\x00-\x17]|\x18.|\x19..|\x1a....)"
_U64 = rb"(?:[\x00-\x17]|\x18.|\x19..|\x1a....|\x1b........)"
# One array element in 0..255, minimally encoded: 0..23 in one byte, 24..255 after 0x18.
_BYTE: Final = rb"(?:[\x00-\x17]|\x18[\x18-\xff])"

_HEAD: Final = re.compile(
    rb"\xa5"
    rb"\x65epoch"
    + _U64
    + rb"\x6csender_index"
    + _U32
    + rb"\x6ageneration"
    + _U32
    + rb"\x65nonce\x98\x18"
    + _BYTE
    + rb"{24}"
    + rb"\x6aciphertext(?:([\x80-\x97])|\x98(.)|\x99(..)|\x9a(....))",
    re.DOTALL,
)
# Each byte's class: s for 0..23 (an element by itself), p for 0x18 (the prefix of a two-byte
# element, or the value 24 after one), b for 0x19..0xff (only ever the value after a prefix).
_CLASSES: Final = bytes.maketrans(bytes(range(256)), b"s" * 0x18 + b"p" + b"b" * 0xE7)


def usual_envelope(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is an EncryptedMessage in the usual layout (see the module doc)."""
    head = _HEAD.match(data)
    if head is None:
        return False
    short, n8, n16, n32 = head.groups()
    count = short[0] - 0x80 if short is not None else int.from_bytes(n8 or n16 or n32, "big")
    start = head.end()
    classes = bytes(data[start:]).translate(_CLASSES)
    # The elements up to the end: with an x after every s, each element is two classes long,
    # so they are well formed when every even position starts one (p or s, never b or x).
    pairs = classes.replace(b"s", b"sx")
    if len(pairs) % 2 or pairs[0::2].translate(None, b"ps"):
        return False
    return len(pairs) // 2 == count
