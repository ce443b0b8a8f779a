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
massaging, ``?ts=``), the same transaction id and ``org.kalandra.log_index`` as live messages.
Each row is deleted in the transaction that records its Matrix event, so a restart resumes
after the last one recorded. Synapse is the slow side, so the messages go one after the other
without waiting for their records: a recorder task writes them in batches (one transaction for
all that were sent meanwhile), at most ``_AHEAD`` waiting besides the batch being written. A
crash can thus leave up to twice ``_AHEAD`` messages sent and not recorded; so, before it sends
anything, a backfill looks for its messages among the room's newest events once (their log
index is in their content; only the bridge's own events count), and takes the event it finds
instead of sending again (Synapse forgets the transaction ids of appservice users when it
restarts, see to_matrix.py). A message that replies to or edits
another waits until everything before it is recorded, as it looks its target up there. The
backfill ends once its last record is written, before anything live is sent. Long backfills
say how far they are in a notice every ``progress_interval`` messages, and once more at the end.

A failed send is retried with backoff, in place, while the failure is transient; a message the
homeserver refuses for good is set aside as the live queue does it (set_aside.py): the bot's
notice takes its place, is recorded for its log index like any event (the row goes with it),
and the backfill goes on. So is a kept row whose sealed content can no longer be opened
(damaged in the database), with a notice that says so, instead of stopping the portal. The
look for what was sent before a restart takes such a notice too, so a set-aside message is
never tried again once its notice is in the room.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mautrix.api import Method, Path
from mautrix.types import EventID, EventType, MessageType, TextMessageEventContent
from mautrix.util.async_db import Database

from kalandra_core.backoff import Backoff, retrying
from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.crypto import DecryptionFailed, sealed

from .. import metrics
from ..db.util import now_ms, transaction, u64_from_db, u64_to_db
from ..members.puppet import member_of
from . import set_aside

if TYPE_CHECKING:
    from ..bot_state import BotState
    from ..context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.backfill")

_PURPOSE = "backfill-content"
_PAGE = 100
_AHEAD = 100  # sent messages waiting for the batch being recorded, at most; the largest batch
_LOOKBACK_PAGES = 20  # of 100 events, searched for history sent before a restart
_RETRY_MAX = 30.0
# Tests only: seconds each batch waits before it is recorded, so that a test can kill the
# bridge with messages sent and not recorded, deterministically.
_RECORD_LAG = float(os.environ.get("KALANDRA_TEST_BACKFILL_RECORD_LAG", "0") or 0)


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


@dataclass(frozen=True, slots=True)
class Kept:
    message: ev.Message
    readable: bool  # False: its content could not be opened (an empty one stands in)


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

    async def first(self, room_id: bytes, limit: int, after: int = -1) -> list[Kept]:
        """The oldest ``limit`` kept messages of the room after log index ``after``; a row
        whose sealed content cannot be opened (damaged, or sealed under another key) comes
        with ``readable`` False and no content."""
        rows = await self.db.fetch(
            "SELECT log_index, sender_id, timestamp_ms, content FROM bridge_backfill"
            " WHERE room_id = $1 AND log_index > $3 ORDER BY log_index LIMIT $2",
            room_id,
            limit,
            after,
        )
        kept = []
        for row in rows:
            try:
                plain = sealed.unseal(self._key, _PURPOSE, bytes(row["content"]))
                content, readable = Content.decode(plain), True
            except DecryptionFailed:
                content, readable = Content(body=""), False
            message = ev.Message(
                room_id,
                u64_from_db(int(row["sender_id"])),
                int(row["log_index"]),
                int(row["timestamp_ms"]),
                content,
            )
            kept.append(Kept(message, readable))
        return kept

    async def done(
        self, room_id: bytes, mx_room: str, bridged: Sequence[tuple[int, EventID | None]]
    ) -> None:
        """Each (log index, event id) is bridged (the event) or skipped (None): in one
        transaction, the bridged ones are recorded, the portal's progress moves past them all
        and their rows go."""
        if not bridged:
            return
        async with transaction(self.db) as conn:
            for log_index, event_id in bridged:
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
                    "DELETE FROM bridge_backfill WHERE room_id = $1 AND log_index = $2",
                    room_id,
                    log_index,
                )
            await conn.execute(
                "UPDATE bridge_portals SET last_log_index = $2"
                " WHERE room_id = $1 AND last_log_index < $2",
                room_id,
                max(log_index for log_index, _ in bridged),
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
    recorder = _Recorder(portal, table, mxid)
    try:
        kept = await table.first(portal.room_id, _PAGE)
        found = await _sent_before(portal, kept[0].message.log_index) if kept else {}
        sent = aside = 0
        while kept:
            for message, readable in ((k.message, k.readable) for k in kept):
                if message.content.reply_to is not None or message.content.edit_of is not None:
                    await recorder.flushed()  # what it refers to is looked up in the table
                event_id, delivered = found.get(message.log_index), True
                if event_id is None:
                    event_id, delivered = await _send(portal, message, readable)
                aside += not delivered
                await recorder.put(message.log_index, event_id)
                sent += 1
                if sent % interval == 0 and sent < total:
                    text = f"History: {sent} of {total} earlier messages bridged."
                    await _progress(portal, text)
            kept = await table.first(portal.room_id, _PAGE, kept[-1].message.log_index)
        await recorder.flushed()  # no row is left once anything live goes
    finally:
        recorder.stop()
    if total >= interval and aside:
        text = f"History: {sent - aside} earlier messages bridged, {aside} set aside."
        await _progress(portal, text)
    elif total >= interval:
        await _progress(portal, f"History: all {sent} earlier messages bridged.")
    log.info("portal %s: backfill done (%d messages), %d set aside", portal.hex, sent, aside)


class _Recorder:
    """Records the sent history in batches, in order, on its own task: up to ``_AHEAD``
    messages may be sent and not yet recorded (see the module doc)."""

    def __init__(self, portal: PortalFace, table: BackfillTable, mxid: str) -> None:
        self._portal, self._table, self._mxid = portal, table, mxid
        self._queue: asyncio.Queue[tuple[int, EventID | None]] = asyncio.Queue(_AHEAD)
        self._task = asyncio.create_task(self._run(), name=f"backfill-rec-{portal.hex}")

    async def put(self, log_index: int, event_id: EventID | None) -> None:
        await self._until(self._queue.put((log_index, event_id)))

    async def flushed(self) -> None:
        await self._until(self._queue.join())

    async def _until(self, waiting: Awaitable[None]) -> None:
        """``waiting``, unless the recorder stops first (then what stopped it is raised)."""
        wait = asyncio.ensure_future(waiting)
        try:
            await asyncio.wait({wait, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wait.cancel()
        if self._task.done():
            self._task.result()
            raise RuntimeError("the backfill recorder stopped")

    async def _run(self) -> None:
        portal = self._portal
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _AHEAD and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if _RECORD_LAG:  # tests only
                await asyncio.sleep(_RECORD_LAG)
            # A busy database: retried; nothing after it is recorded meanwhile.
            done = functools.partial(self._table.done, portal.room_id, self._mxid, batch)
            what = f"portal {portal.hex}: recording history up to log index {batch[-1][0]}"
            await retrying(done, what, log, cap=_RETRY_MAX)
            for _ in batch:
                self._queue.task_done()

    def stop(self) -> None:
        self._task.cancel()


async def _send(
    portal: PortalFace, message: ev.Message, readable: bool
) -> tuple[EventID | None, bool]:
    """The message's event (None: not for Matrix) and True; or, once the homeserver has refused
    it for good (or at once if its kept copy is not ``readable``), the notice set aside in its
    place and False (set_aside.py). Transient failures are retried with backoff, in place, so
    the order holds."""
    if not readable:
        return await portal.set_aside(message, set_aside.UNREADABLE), False
    backoff, attempts = Backoff(cap=_RETRY_MAX), set_aside.Attempts()
    while True:
        try:
            when = message.timestamp_ms
            return await portal.to_matrix(message, timestamp=when, looked_for=True), True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.failed_to_matrix(exc)
            reason = attempts.set_aside(exc)
            if reason is not None:
                return await portal.set_aside(message, reason), False
            log.warning(
                "portal %s: history (log index %d) not bridged yet (%s); retrying",
                portal.hex,
                message.log_index,
                type(exc).__name__,
            )
        await backoff.pause()


async def _sent_before(portal: PortalFace, first: int) -> dict[int, EventID]:
    """The events (by log index) a backfill before a restart sent but did not record: the
    room's newest events back to the first bridged message before log index ``first``. Split
    messages are left out: to_matrix looks for their parts itself, each time. A set-aside
    notice of the bot counts for the message it stands for. Only the bridge's own events (its
    ghosts', the bot's) are read: a Matrix user's event that carries a log index is no message
    of ours (taken for one, it would hide the message, and its event id, bridged the other way,
    could never be recorded for it)."""
    path = Path.v3.rooms[portal.room_mxid].messages
    types = [str(EventType.ROOM_MESSAGE), str(EventType.ROOM_ENCRYPTED), str(EventType.STICKER)]
    query = {"dir": "b", "limit": "100", "filter": json.dumps({"types": types})}
    api, bot = portal.bridge.az.intent.api, portal.bridge.az.intent.mxid
    found: dict[int, EventID] = {}
    for _ in range(_LOOKBACK_PAGES):
        page = await retrying(
            functools.partial(api.request, Method.GET, path, query_params=query),
            f"portal {portal.hex}: looking for history sent before",
            log,
            cap=_RETRY_MAX,
        )
        for event in page.get("chunk", []):
            content, sender = event.get("content", {}), str(event.get("sender", ""))
            index = None
            if sender == bot:
                index = set_aside.notice_for(content)
            elif member_of(portal.bridge, sender) is not None:  # a ghost
                index = content.get(set_aside.LOG_INDEX_KEY)
            if not isinstance(index, int):
                continue
            if index < first:
                return found
            if set_aside.PARTS_KEY not in content:
                found.setdefault(index, EventID(event["event_id"]))
        if not page.get("chunk") or not page.get("end"):
            return found
        query["from"] = page["end"]
    return found


async def _progress(portal: PortalFace, text: str) -> None:
    mxid = portal.row.mxid
    assert mxid is not None
    content = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text)
    try:
        await portal.bridge.az.intent.send_message(mxid, content)
    except Exception as exc:  # a progress line is a nicety: the backfill goes on
        log.warning("portal %s: progress notice not sent (%s)", portal.hex, type(exc).__name__)
