"""The client's local state: one SQLite file, every secret sealed under a local key.

Identity (member id, device signing key, token, server), each room (MLS group, sender keys,
last applied log index), unused KeyPackage bundles, the outbox and the send marks
(send_marks.py). The sealing key lives in a
separate file (mode 0600) beside the database, so a copied database alone reveals nothing.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cbor2

from ..crypto import sealed
from ..mls.keypackage import KeyPackageBundle
from .content import Content
from .core import ClientCore
from .events import Message, Moderated, Reacted
from .room import ClientRoom, Pending

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (room_id BLOB PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (ref BLOB PRIMARY KEY, bundle BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (request_id INTEGER PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS send_marks (id INTEGER PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    room_id BLOB NOT NULL, log_index INTEGER NOT NULL, sender_id INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL, content BLOB NOT NULL, PRIMARY KEY (room_id, log_index)
);
CREATE TABLE IF NOT EXISTS room_events (
    room_id BLOB NOT NULL, log_index INTEGER NOT NULL, sender_id INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (room_id, log_index)
);
"""


@dataclass(frozen=True, slots=True)
class Identity:
    server: str
    token: str
    member_id: int
    signing_key: bytes
    ca: bytes | None


class ClientState:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._key = _load_or_create_key(path.with_suffix(".key"))
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- identity --------------------------------------------------------------------------

    def save_identity(
        self,
        *,
        server: str,
        token: str,
        member_id: int,
        signing_key: bytes,
        ca: bytes | None = None,
    ) -> None:
        blob = cbor2.dumps(
            {
                "server": server,
                "token": token,
                "member_id": member_id,
                "signing_key": signing_key,
                "ca": ca,
            }
        )
        self._put("identity", "key", "login", sealed.seal(self._key, "identity", blob))

    def load_identity(self) -> Identity | None:
        row = self._db.execute("SELECT value FROM identity WHERE key = 'login'").fetchone()
        if row is None:
            return None
        data = cbor2.loads(sealed.unseal(self._key, "identity", row[0]))
        return Identity(
            server=str(data["server"]),
            token=str(data["token"]),
            member_id=int(data["member_id"]),
            signing_key=bytes(data["signing_key"]),
            ca=data.get("ca"),
        )

    # --- rooms, bundles, outbox ---------------------------------------------------------------

    def load_into(self, core: ClientCore) -> None:
        for (blob,) in self._db.execute("SELECT state FROM rooms"):
            room = ClientRoom.from_bytes(sealed.unseal(self._key, "room", blob))
            core.rooms[room.room_id] = room
        for ref, blob in self._db.execute("SELECT ref, bundle FROM bundles"):
            core.bundles[ref] = KeyPackageBundle.from_bytes(sealed.unseal(self._key, "kp", blob))
        for (blob,) in self._db.execute("SELECT state FROM outbox"):
            pending = Pending.from_state(cbor2.loads(sealed.unseal(self._key, "outbox", blob)))
            core.load_pending(pending)
        for (blob,) in self._db.execute("SELECT state FROM send_marks"):
            core.send_marks.load(sealed.unseal(self._key, "send-marks", blob))

    def save(self, core: ClientCore, rooms: Iterable[bytes | None]) -> None:
        """Persist the given rooms (None: bundles), the whole outbox and the send marks, in one
        transaction."""
        db = self._db
        db.execute("BEGIN")
        try:
            for room_id in rooms:
                if room_id is None:
                    db.execute("DELETE FROM bundles")
                    db.executemany(
                        "INSERT INTO bundles (ref, bundle) VALUES (?, ?)",
                        [
                            (ref, sealed.seal(self._key, "kp", b.to_bytes()))
                            for ref, b in core.bundles.items()
                        ],
                    )
                    continue
                room = core.rooms.get(room_id)
                core.forget_merged(room_id, room.last_seen if room is not None else 1 << 62)
                if room is None:
                    db.execute("DELETE FROM rooms WHERE room_id = ?", (room_id,))
                else:
                    blob = sealed.seal(self._key, "room", room.to_bytes())
                    db.execute(
                        "INSERT OR REPLACE INTO rooms (room_id, state) VALUES (?, ?)",
                        (room_id, blob),
                    )
            db.execute("DELETE FROM outbox")
            db.executemany(
                "INSERT INTO outbox (request_id, state) VALUES (?, ?)",
                [
                    (rid, sealed.seal(self._key, "outbox", cbor2.dumps(p.to_state())))
                    for rid, p in [*core.outbox.items(), *core.merged.items()]
                ],
            )
            db.execute(
                "INSERT OR REPLACE INTO send_marks (id, state) VALUES (0, ?)",
                (sealed.seal(self._key, "send-marks", core.send_marks.to_bytes()),),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def durable(self) -> None:
        """Writes are synchronous here (``synchronous=FULL``): saved is durable."""

    def save_all(self, core: ClientCore) -> None:
        self.save(core, [None, *core.rooms])

    # --- message history (sealed: no plaintext at rest) ------------------------------------

    def store_message(self, message: Message) -> None:
        blob = sealed.seal(self._key, "message", message.content.encode())
        self._db.execute(
            "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?)",
            (
                message.room_id,
                message.log_index,
                _signed(message.sender_id),
                message.timestamp_ms,
                blob,
            ),
        )

    def history(self, room_id: bytes, limit: int = 50) -> list[Message]:
        rows = self._db.execute(
            "SELECT log_index, sender_id, timestamp_ms, content FROM messages"
            " WHERE room_id = ? ORDER BY log_index DESC LIMIT ?",
            (room_id, limit),
        ).fetchall()
        return [
            Message(
                room_id,
                _unsigned(sender),
                index,
                stamp,
                Content.decode(sealed.unseal(self._key, "message", blob)),
            )
            for index, sender, stamp, blob in reversed(rows)
        ]

    def store_event(self, event: Reacted | Moderated) -> None:
        """A reaction (or its removal) or a redaction, for the history; a redaction also drops
        the redacted message's content from this file."""
        data: dict[str, object]
        if isinstance(event, Reacted):
            data = {"reaction": [event.target, event.key, event.add]}
            row = (event.room_id, event.log_index, event.sender_id)
        else:
            data = {"redact": event.target}
            row = (event.room_id, event.log_index, event.moderator_id)
            tombstone = sealed.seal(self._key, "message", Content(body="", kind="notice").encode())
            self._db.execute(
                "UPDATE messages SET content = ? WHERE room_id = ? AND log_index = ?",
                (tombstone, event.room_id, event.target),
            )
        blob = sealed.seal(self._key, "room-event", cbor2.dumps(data))
        self._db.execute(
            "INSERT OR IGNORE INTO room_events VALUES (?, ?, ?, ?)",
            (row[0], row[1], _signed(row[2]), blob),
        )

    def entries(self, room_id: bytes) -> list[Message | Reacted | Moderated]:
        """Every message, reaction and redaction kept of the room, in log order."""
        out: list[Message | Reacted | Moderated] = list(self.history(room_id, -1))
        for index, sender, blob in self._db.execute(
            "SELECT log_index, sender_id, data FROM room_events WHERE room_id = ?", (room_id,)
        ):
            data = cbor2.loads(sealed.unseal(self._key, "room-event", blob))
            sender = _unsigned(sender)
            if "reaction" in data:
                target, key, add = data["reaction"]
                out.append(Reacted(room_id, sender, index, int(target), str(key), bool(add)))
            else:
                out.append(Moderated(room_id, index, "redact", sender, int(data["redact"])))
        return sorted(out, key=lambda e: e.log_index)

    def save_displayname(self, name: str | None) -> None:
        if name is None:
            self._db.execute("DELETE FROM identity WHERE key = 'displayname'")
            return
        self._put("identity", "key", "displayname", sealed.seal(self._key, "name", name.encode()))

    def load_displayname(self) -> str | None:
        row = self._db.execute("SELECT value FROM identity WHERE key = 'displayname'").fetchone()
        return None if row is None else sealed.unseal(self._key, "name", row[0]).decode()

    def _put(self, table: str, key_column: str, key: str, value: bytes) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO {table} ({key_column}, value) VALUES (?, ?)", (key, value)
        )


def _signed(value: int) -> int:
    # SQLite integers are signed 64-bit; member ids are u64.
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path}: not a 32-byte key")
        return key
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
