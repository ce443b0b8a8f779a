"""Send marks: the highest sender-key generation each of the client's encryptions used, per
(room, epoch, leaf), kept apart from the room states.

A message key must never encrypt two plaintexts. The send chains live in the room state, but a
room state may be restored from a snapshot older than the last sends (a crash before it was
saved; the bridge saves a room's snapshot only once its portal caught up, bridge/bot_state.py),
and a message re-encrypted after STALE_EPOCH uses a chain of the new epoch that no saved room
state has seen. So every encryption of the core records its generation here, the frame goes out
only once these marks are saved (the write-ahead of ``ClientCore``, as for commits), and every
encryption first moves the chain past the mark of its epoch. Marks of epochs the room has left
are dropped (no one sends in an old epoch).
"""

from __future__ import annotations

from typing import Any

import cbor2

from ..crypto import SenderKeyStore
from ..proto.payloads import EncryptedMessage


class SendMarks:
    def __init__(self) -> None:
        # room -> {(epoch, leaf): the highest generation used}
        self._marks: dict[bytes, dict[tuple[int, int], int]] = {}

    def encrypt(self, room_id: bytes, keys: SenderKeyStore, plaintext: bytes) -> EncryptedMessage:
        """Encrypt as our own leaf past the recorded mark, and record the generation used."""
        marks = self._marks.setdefault(room_id, {})
        for key in [k for k in marks if k[0] < keys.epoch]:
            del marks[key]  # an epoch left behind
        leaf = keys.own_index
        used = marks.get((keys.epoch, leaf))
        if used is not None and keys.send_generation(leaf) <= used:
            keys.skip_send_to(leaf, used + 1)
        envelope = keys.encrypt(plaintext)
        marks[(envelope.epoch, leaf)] = envelope.generation
        return envelope

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            [
                [room_id, epoch, leaf, generation]
                for room_id, marks in self._marks.items()
                for (epoch, leaf), generation in marks.items()
            ]
        )

    def load(self, data: bytes) -> None:
        rows: list[list[Any]] = cbor2.loads(data)
        for room_id, epoch, leaf, generation in rows:
            marks = self._marks.setdefault(bytes(room_id), {})
            key = (int(epoch), int(leaf))
            marks[key] = max(marks.get(key, -1), int(generation))
