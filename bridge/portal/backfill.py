"""History for new portals: what the bot decrypted before the room had a portal.

The bot can read a room's messages from the epoch its leaf joined on, and once the group has
moved on they cannot be decrypted again. So, with ``bridge.backfill.enabled``, the messages
of rooms that have no portal are kept (:class:`HistoryBuffer`, table ``bridge_backfill``,
content sealed under ``bridge.mls_state_key``, the newest ``max_messages`` per room); a
redaction deletes its message there, and the bot leaving the room deletes them all. Each is
counted done for the bot's state barrier (bot_state.py) only once written, so a crash loses
none.

When a portal is made for such a room, those rows are its backfill queue, sent before
anything live (:func:`backfill`, at the head of the portal's queue toward Matrix): in log
order, by the sender's ghost, with the message's original time (appservice timestamp
massaging, ``?ts=``), the same transaction id and ``org.kalandra.log_index`` as live messages;
each row is deleted in the transaction that records its Matrix event, so a restart resumes
after the last one recorded and sends nothing twice. Long backfills say how far they are in a
notice every ``progress_interval`` messages, and once more at the end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mautrix.types import EventID, MessageType, TextMessageEventContent
from mautrix.util.async_db import Database

from kalandra_core.backoff import retrying
from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.crypto import sealed

from ..db.util import now_ms, transaction, u64_from_db, u64_to_db

if TYPE_CHECKING:
    from ..bot_state import BotState
    from ..context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.backfill")

_PURPOSE = "backfill-content"
_PAGE = 100
_RETRY_MAX = 30.0


@dataclass(frozen=True, slots=True)
class BackfillSettings:
    enabled: bool
    max_messages: int
    progress_interval: int

    @classmethod
    def of(cls, bridge: BridgeContext) -> BackfillSettings:
        config = bridge.config
        return cls(
            enabled=bool(config["bridge.backfill.enabled"]),
            max_messages=max(0, int(config["bridge.backfill.max_messages"])),
            progress_interval=max(1, int(config["bridge.backfill.progress_interval"])),
        )


class BackfillTable:
    def __init__(self, db: Database, key: bytes) -> None:
        self.db = db
        self._key = key

    async def write(self, items: Iterable[ev.Event], max_messages: int) -> None:
        """Messages kept, redacted ones and the rooms the bot left forgotten, in one
        transaction, in order; then each touched room cut to its newest ``max_messages``."""
        rooms: set[bytes] = set()
        async with transaction(self.db) as conn:
            for item in items:
                if isinstance(item, ev.Message):
                    await conn.execute(
                        "INSERT INTO bridge_backfill"
                        " (room_id, log_index, sender_id, timestamp_ms, content)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id, log_index) DO NOTHING",
                        item.room_id,
                        item.log_index,
                        u64_to_db(item.sender_id),
                        item.timestamp_ms,
                        sealed.seal(self._key, _PURPOSE, item.content.encode()),
                    )
                    rooms.add(item.room_id)
                elif isinstance(item, ev.Moderated) and item.action == "redact":
                    await conn.execute(
                        "DELETE FROM bridge_backfill WHERE room_id = $1 AND log_index = $2",
                        item.room_id,
                        item.target,
                    )
                elif isinstance(item, ev.Left):
                    await conn.execute(
                        "DELETE FROM bridge_backfill WHERE room_id = $1", item.room_id
                    )
            for room_id in rooms:
                await conn.execute(
                    "DELETE FROM bridge_backfill WHERE room_id = $1 AND log_index <= ("
                    " SELECT log_index FROM bridge_backfill WHERE room_id = $1"
                    " ORDER BY log_index DESC LIMIT 1 OFFSET $2)",
                    room_id,
                    max_messages,
                )

    async def count(self, room_id: bytes) -> int:
        value = await self.db.fetchval(
            "SELECT COUNT(*) FROM bridge_backfill WHERE room_id = $1", room_id
        )
        return int(value or 0)

    async def first(self, room_id: bytes, limit: int) -> list[ev.Message]:
        rows = await self.db.fetch(
            "SELECT log_index, sender_id, timestamp_ms, content FROM bridge_backfill"
            " WHERE room_id = $1 ORDER BY log_index LIMIT $2",
            room_id,
            limit,
        )
        return [
            ev.Message(
                room_id,
                u64_from_db(int(row["sender_id"])),
                int(row["log_index"]),
                int(row["timestamp_ms"]),
                Content.decode(sealed.unseal(self._key, _PURPOSE, bytes(row["content"]))),
            )
            for row in rows
        ]

    async def done(
        self, room_id: bytes, log_index: int, mx_room: str, event_id: EventID | None
    ) -> None:
        """The message is bridged (``event_id``) or skipped (None): its row goes, in the
        transaction that records it and moves the portal's progress past it."""
        async with transaction(self.db) as conn:
            if event_id is not None:
                await conn.execute(
                    "INSERT INTO bridge_messages"
                    " (room_id, log_index, mx_room, event_id, direction, created_at)"
                    " VALUES ($1, $2, $3, $4, 'to_matrix', $5)"
                    " ON CONFLICT (room_id, log_index) DO NOTHING",
                    room_id,
                    log_index,
                    mx_room,
                    event_id,
                    now_ms(),
                )
            await conn.execute(
                "UPDATE bridge_portals SET last_log_index = $2"
                " WHERE room_id = $1 AND last_log_index < $2",
                room_id,
                log_index,
            )
            await conn.execute(
                "DELETE FROM bridge_backfill WHERE room_id = $1 AND log_index = $2",
                room_id,
                log_index,
            )

    async def clear(self) -> None:
        await self.db.execute("DELETE FROM bridge_backfill")


class HistoryBuffer:
    """Takes what the bot routes for rooms without a portal (bot.py) and writes it on its own
    task, batched, in order; each item is counted done once written."""

    def __init__(self, bridge: BridgeContext, state: BotState) -> None:
        key = bridge.config.mls_state_key
        assert key is not None  # checked with the config
        self.settings = BackfillSettings.of(bridge)
        self.table = BackfillTable(bridge.db, key)
        self._state = state
        self._pending: list[ev.Event] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def put(self, item: ev.Event) -> None:
        self._pending.append(item)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="backfill-buffer")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            # A busy database: retried; nothing is counted done meanwhile.
            write = functools.partial(self.table.write, batch, self.settings.max_messages)
            await retrying(write, "keeping history", log, cap=_RETRY_MAX)
            for item in batch:
                room_id = getattr(item, "room_id", None)
                if isinstance(room_id, bytes):
                    self._state.message_done(room_id)
            if not self._wake.is_set():
                self._idle.set()

    async def flush(self) -> None:
        """Wait until everything put so far is written."""
        while not self._idle.is_set():
            await self._idle.wait()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


async def backfill(portal: PortalFace) -> None:
    """Send the portal's kept history (see the module doc); returns once none is left."""
    history = portal.bridge.bot.history
    if not isinstance(history, HistoryBuffer):
        return  # (None: backfill is off)
    await history.flush()  # what was routed before the portal existed is in the table
    table, interval = history.table, history.settings.progress_interval
    total = await table.count(portal.room_id)
    if total == 0:
        return
    log.info("portal %s: backfilling %d messages", portal.hex, total)
    mxid = portal.row.mxid
    assert mxid is not None
    sent = 0
    while messages := await table.first(portal.room_id, _PAGE):
        for message in messages:
            event_id = await _send(portal, message)
            await table.done(portal.room_id, message.log_index, mxid, event_id)
            sent += 1
            if sent % interval == 0 and sent < total:
                await _progress(portal, f"History: {sent} of {total} earlier messages bridged.")
    if total >= interval:
        await _progress(portal, f"History: all {sent} earlier messages bridged.")
    log.info("portal %s: backfill done (%d messages)", portal.hex, sent)


async def _send(portal: PortalFace, message: ev.Message) -> EventID | None:
    send = functools.partial(portal.to_matrix, message, timestamp=message.timestamp_ms)
    what = f"portal {portal.hex}: history (log index {message.log_index})"
    return await retrying(send, what, log, cap=_RETRY_MAX)


async def _progress(portal: PortalFace, text: str) -> None:
    mxid = portal.row.mxid
    assert mxid is not None
    content = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text)
    try:
        await portal.bridge.az.intent.send_message(mxid, content)
    except Exception as exc:  # a progress line is a nicety: the backfill goes on
        log.warning("portal %s: progress notice not sent (%s)", portal.hex, type(exc).__name__)
