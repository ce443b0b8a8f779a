"""A portal's queue toward Matrix: the Kalandra room's log, applied in order.

The bot's client applies the log in order and hands each decrypted message, commit (epoch
change), moderation and failure to its portal (commits and moderation: members.py); the
portal sends a message from the sender's ghost with the transaction id ``kalandra-<room hex>-<log
index>`` (Synapse answers a repeat with the first event), records (room, log index) <-> event id
and advances ``last_log_index`` in one transaction, and only then counts the message as done
(which lets the bot's room state be saved past it, see bot_state.py). After a restart the client
resyncs from its saved state and the portal skips what ``last_log_index`` says is bridged. A
failed send is retried, in place, so the order holds, unless the homeserver refuses it for good:
then the item is set aside with a notice and the queue goes on (set_aside.py, which also says
how oversized text is split). Entries that are not messages advance ``last_log_index`` the same
way, once mirrored.

Recording is pipelined with sending (Synapse is the slow side; a durable commit per message
would otherwise add its fsync to every send): the sender hands (message, event id) to a
recorder task and goes on with the next message, up to ``_PIPELINE`` ahead. The recorder
writes in log order and only then counts each item done, so ``last_log_index`` and the bot's
state barrier never pass an unrecorded message; a crash before a record means the message is
sent again after the restart with the same transaction id, and Synapse answers with the first
event. Items that are not messages wait until everything before them is recorded.

Synapse keeps the transaction ids of appservice users (no device) in memory only: a send whose
answer was lost when Synapse crashed may have made the event, and the same transaction id would
make a second one once Synapse is back. So each message carries its log index
(``org.kalandra.log_index``), and before sending again after a failed attempt the portal looks
for it among the ghost's latest events in the room; so does each of the first ``_PIPELINE``
messages after a start (sent, maybe, by the process before, not recorded, and Synapse may have
restarted since); a split message looks for the parts it sent before every time (a crash in
the middle of one is the case to cover).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from typing import TYPE_CHECKING

from mautrix.api import Method, Path
from mautrix.appservice import IntentAPI
from mautrix.client import ClientAPI
from mautrix.errors import MatrixConnectionError, MForbidden
from mautrix.types import (
    JSON,
    EventID,
    EventType,
    Format,
    Membership,
    MessageType,
    TextMessageEventContent,
    UserID,
)

from kalandra_core.backoff import Backoff, retrying
from kalandra_core.client import events as ev
from kalandra_core.client.bridge_invite import invited_mxid
from kalandra_core.client.content import Content
from kalandra_core.client.events import Message

from .. import metrics
from ..convert.formatting import formatted_message
from ..db import MessageTable, PortalRow
from ..encryption import e2ee
from ..members import ghost_profile
from ..routed import Item, MatrixInvite, RosterCheck
from . import admission, backfill, ephemeral, media, relations, room_metadata, set_aside
from .members import PortalMembers

if TYPE_CHECKING:
    from ..context import BridgeContext, Ghost

log = logging.getLogger("kalandra.bridge.portal")

KINDS = {"text": MessageType.TEXT, "notice": MessageType.NOTICE, "emote": MessageType.EMOTE}
_RETRY_MAX = 30.0
_PIPELINE = 32  # messages sent to Matrix but not yet recorded, at most
LOG_INDEX_KEY = set_aside.LOG_INDEX_KEY
_LOOKBACK_PAGES = 20  # of 100 events, searched for an unsure send (see _sent_before)
_NOTICE_LOOKBACK_PAGES = 2  # of the bot's 100 latest events, searched for a set-aside notice
# Tests only: seconds a sent message waits before it is recorded, so that a test can kill the
# bridge in between, deterministically.
_RECORD_LAG = float(os.environ.get("KALANDRA_TEST_MATRIX_RECORD_LAG", "0") or 0)
_PART_LIMIT = set_aside.PART_LIMIT


def matrix_content(content: Content) -> TextMessageEventContent:
    """A Kalandra message body as m.room.message content (HTML sanitized:
    convert/formatting.py)."""
    out = TextMessageEventContent(msgtype=KINDS.get(content.kind, MessageType.TEXT))
    out.body, formatted = formatted_message(content.body, content.formatted_body)
    if formatted is not None:
        out.format = Format.HTML
        out.formatted_body = formatted
    return out


def _report_death(task: asyncio.Task[None]) -> None:
    """A portal queue's task never ends on its own: if it does, say so (it would stall the
    portal silently otherwise)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception())


class PortalToMatrix(PortalMembers):
    def __init__(self, bridge: BridgeContext, row: PortalRow) -> None:
        super().__init__(bridge, row)
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # (message, its Matrix event id, or None: nothing to record, only count it done;
        # delivered: False for a message set aside, whose event id is the notice's)
        self._records: asyncio.Queue[tuple[Message, EventID | None, bool]] = asyncio.Queue(
            _PIPELINE
        )
        self._recorder: asyncio.Task[None] | None = None
        self._ghosts_in_room: set[UserID] = set()  # joined by this process (see _to_matrix)
        self._unsure: int | None = None  # log index of a send that failed: made or not?
        # The first messages after a start may have been sent by the previous process, ahead
        # of their records (the pipeline), to a Synapse that has restarted since and forgot
        # their transaction ids: each is looked for in the room before it is sent. Only those
        # already in the log when this process started (run_state.log_heads): a request each,
        # which a portal made or a message sequenced since need not wait for.
        self._unsure_from_start = _PIPELINE
        on = bool(bridge.config["bridge.delivery_receipts"])
        self._delivery = ephemeral.KalandraDelivery(self.face) if on else None

    def _start_to_matrix(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"portal-{self.hex}")
            self._recorder = asyncio.create_task(self._record(), name=f"portal-rec-{self.hex}")
            for task in (self._task, self._recorder):
                task.add_done_callback(_report_death)
            # A portal made while the bot runs starts from the group as it is now; the ones
            # loaded at start-up are checked once the bot's client has caught up (bot.py).
            bot = getattr(self.bridge, "bot", None)
            if bot is not None and bot.client is not None:
                bot.check_roster(self)

    def _stop_to_matrix(self) -> None:
        for task in (self._task, self._recorder):
            if task is not None:
                task.cancel()
        self._task = self._recorder = None
        if self._delivery is not None:
            self._delivery.stop()

    def enqueue(self, item: Item) -> None:
        self.queue.put_nowait(item)

    async def records_flushed(self) -> None:
        await self._records.join()

    async def _run(self) -> None:
        await self.room_ready.wait()
        await self.bridge.matrix_ready.wait()
        await backfill.backfill(self.face)  # history first, before anything live
        while True:
            item = await self.queue.get()
            if not isinstance(item, Message):
                await self.records_flushed()  # what came before it is recorded first
            backoff, attempts = Backoff(cap=_RETRY_MAX), set_aside.Attempts()
            while True:
                try:
                    if isinstance(item, Message):
                        await self._send(item)
                    else:
                        await self._mirror(item)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    metrics.failed_to_matrix(exc)
                    reason = attempts.set_aside(exc)
                    if reason is not None:
                        await self._set_aside(item, reason)
                        break
                    log.warning(
                        "portal %s: %s (log index %d) not bridged yet (%s); retrying",
                        self.hex,
                        type(item).__name__,
                        getattr(item, "log_index", -1),
                        type(exc).__name__,
                    )
                    await backoff.pause()
            if not isinstance(item, Message):
                self.bridge.bot.state.message_done(self.room_id)

    async def _record(self) -> None:
        """Records sent messages in log order, then counts them done (see the module doc)."""
        while True:
            message, event_id, delivered = await self._records.get()
            if _RECORD_LAG and event_id is not None:  # tests only
                await asyncio.sleep(_RECORD_LAG)
            if event_id is not None:
                # A busy database: retried; nothing after it advances meanwhile.
                record = functools.partial(
                    MessageTable(self.bridge.db).record_to_matrix,
                    self.room_id,
                    message.log_index,
                    self.room_mxid,
                    event_id,
                )
                what = f"portal {self.hex}: recording log index {message.log_index}"
                await retrying(record, what, log, cap=_RETRY_MAX)
                self.row.last_log_index = message.log_index
                self.row.last_event_id = event_id
            if event_id is not None and delivered and self._delivery is not None:
                self._delivery.delivered(message.log_index)
            self.bridge.bot.state.message_done(self.room_id)
            self._records.task_done()

    async def _send(self, message: Message) -> None:
        """A message to Matrix (unless it was bridged before, or came from Matrix), handed to
        the recorder."""
        event_id = None
        if message.log_index > self.row.last_log_index:
            event_id = await self.to_matrix(message)
            if event_id is not None:
                metrics.bridged_to_matrix(message.timestamp_ms)
        await self._records.put((message, event_id, True))

    async def _set_aside(self, item: Item, reason: str) -> None:
        """The homeserver refused ``item`` for good: a notice takes its place (set_aside.py)."""
        if isinstance(item, Message):
            notice = await self.set_aside(item, reason)
            await self._records.put((item, notice, False))
            return
        index = getattr(item, "log_index", -1)
        self._aside_said(type(item).__name__, index, reason)
        if index > self.row.last_log_index:
            try:
                await self.advance(index, None)
            except Exception as exc:  # not advanced: tried (and set aside) again at start
                log.warning("portal %s: not advanced (%s)", self.hex, type(exc).__name__)

    async def set_aside(self, message: Message, reason: str) -> EventID | None:
        """The homeserver refused ``message`` for good: the bot's notice that takes its place,
        to be recorded for it (None: the notice was refused too). Transient failures of the
        notice are retried."""
        self._aside_said(type(message).__name__, message.log_index, reason)
        backoff = Backoff(cap=_RETRY_MAX)
        while True:
            try:
                # Posted before a crash, maybe, and not recorded (see _notice_sent_before).
                found = await self._notice_sent_before(message.log_index)
                return found or await self._aside_notice(message, reason)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if set_aside.permanent_reason(exc) is not None:
                    log.error("portal %s: no set-aside notice (%s)", self.hex, type(exc).__name__)
                    return None
                await backoff.pause()

    def _aside_said(self, kind: str, index: int, reason: str) -> None:
        metrics.set_aside_to_matrix(reason)
        log.error(
            "portal %s: %s (log index %d) set aside (%s)",
            self.hex,
            kind,
            index,
            reason,
        )
        self._unsure = None

    async def _notice_sent_before(self, log_index: int) -> EventID | None:
        """The bot's set-aside notice for ``log_index`` among its latest events in the room:
        one sent before a crash and not recorded, to a Synapse that may have forgotten its
        transaction id since. Set-asides are rare: a request or two each."""
        path = Path.v3.rooms[self.room_mxid].messages
        types = [str(EventType.ROOM_MESSAGE), str(EventType.ROOM_ENCRYPTED)]
        senders = [self._bot.mxid]
        query = {
            "dir": "b",
            "limit": "100",
            "filter": json.dumps({"types": types, "senders": senders}),
        }
        for _ in range(_NOTICE_LOOKBACK_PAGES):
            page = await self._bot.api.request(Method.GET, path, query_params=query)
            for event in page.get("chunk", []):
                if event.get("sender") != self._bot.mxid:
                    continue
                if set_aside.notice_for(event.get("content", {})) == log_index:
                    log.info("portal %s: notice for log index %d sent before", self.hex, log_index)
                    return EventID(event["event_id"])
            if not page.get("chunk") or not page.get("end"):
                return None
            query["from"] = page["end"]
        return None

    async def _aside_notice(self, message: Message, reason: str) -> EventID:
        ghost = (await self.bridge.puppets.get(message.sender_id)).mxid
        text = set_aside.notice_text(ghost, message.log_index, message.timestamp_ms, reason)
        content = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text).serialize()
        content[set_aside.SET_ASIDE_KEY] = {
            "log_index": message.log_index,
            "sender": ghost,
            "reason": reason,
        }
        event_type = EventType.ROOM_MESSAGE
        if self.row.encrypted and e2ee.manager(self.bridge) is not None:
            event_type, encrypted = await e2ee.encrypt(
                self.bridge, self.room_mxid, event_type, content
            )
            # What it stands for in clear as well: the backfill looks for it without decrypting.
            marker = {"log_index": message.log_index}
            content = JSON({**encrypted.serialize(), set_aside.SET_ASIDE_KEY: marker})
        return await self._bot.send_message_event(
            self.room_mxid, event_type, content, txn_id=self._txn(message.log_index, "aside")
        )

    async def _mirror(self, item: Item) -> None:
        """An entry that is not a message (commits, moderation, ...)."""
        assert not isinstance(item, Message)
        index = getattr(item, "log_index", -1)
        if 0 <= index <= self.row.last_log_index:
            return  # bridged before a restart
        if isinstance(item, ev.EpochChanged):
            await self._epoch_changed(item)
            metrics.epoch_changed()
        elif isinstance(item, ev.Moderated):
            await self._moderated(item)
        elif isinstance(item, RosterCheck):
            await self._roster_check(item)
        elif isinstance(item, MatrixInvite):
            await self._invite_user(item.mxid)
        elif isinstance(item, ev.Left):
            await self._left(item)
        elif isinstance(item, ev.Reacted):
            await relations.reaction_to_matrix(self.face, item)
        elif isinstance(item, ev.Receipted):
            await ephemeral.receipt_to_matrix(self.face, item)
        elif isinstance(item, ev.Typing):
            await ephemeral.typing_to_matrix(self.face, item)
        elif isinstance(item, ev.RoomMetaChanged):
            await room_metadata.meta_to_matrix(self.face, item)
        else:
            await self._undecryptable(item)

    async def to_matrix(
        self, message: Message, timestamp: int | None = None, *, looked_for: bool = False
    ) -> EventID | None:
        """Send the message from its sender's ghost; its event id (None: not for Matrix).
        ``timestamp``: the event's time (ms) instead of now (history, backfill.py);
        ``looked_for``: the caller has looked for it in the room already (backfill.py does, for
        its whole history at once), so a first attempt needs no look of its own."""
        if message.sender_id == self.bridge.bot.member_id:
            return None  # the bot's own (relayed) messages came from Matrix
        if message.sender_id in self.bridge.bridged_users.member_ids:
            return None  # a bridged Matrix user's message: it came from Matrix (no echo)
        invited = invited_mxid(message.content)  # a native member lets a Matrix user in?
        if invited is not None and await admission.native_invite(self, message, UserID(invited)):
            await self._invite_user(UserID(invited))
        puppet = await self.ghost(message.sender_id)
        await ghost_profile.follow(self.bridge, self.room_mxid, puppet, message.content)
        event_type, base = EventType.ROOM_MESSAGE, matrix_content(message.content)
        if message.content.media is not None:  # the file first, uploaded by the ghost
            event_type, base = await media.to_matrix(self.face, puppet.intent, message.content)
        plain = base.body
        parts = [(await relations.decorate(self.face, message.content, base)).serialize()]
        if message.content.media is None and set_aside.content_size(parts[0]) > _PART_LIMIT:
            parts = await self._split(message, base.msgtype, plain)
        sent: dict[int, EventID] = {}
        # Only a message in the log before this process started can have been sent by an
        # earlier one (backfill looks for those itself: looked_for).
        head = self.bridge.run_state.log_heads.get(self.room_id, 0)
        from_before = not looked_for and message.log_index < head
        if self._unsure_from_start > 0 and from_before:
            self._unsure_from_start -= 1
        else:
            from_before = False
        if self._unsure == message.log_index or from_before or len(parts) > 1:
            sent = await self._sent_before(puppet.mxid, message.log_index)
        self._unsure = message.log_index  # until Synapse has answered every part
        first = None
        for number, content in enumerate(parts):
            event_id = sent.get(number)
            if event_id is None:
                event_id = await self._send_part(puppet, message, event_type, content, timestamp)
            first = first or event_id
        self._unsure = None
        return first  # the message's event, for what refers to it (replies, reactions)

    async def _split(self, message: Message, msgtype: MessageType, text: str) -> list[JSON]:
        """Plain parts of an oversized text, numbered; only the first replies (set_aside.py)."""
        pieces = set_aside.split_text(text, _PART_LIMIT // 2)  # room for an edit's copy
        parts = []
        for number, piece in enumerate(pieces):
            out = TextMessageEventContent(msgtype=msgtype, body=piece)
            if number == 0:
                out = await relations.decorate(self.face, message.content, out)
            content = out.serialize()
            content[set_aside.PART_KEY] = number
            content[set_aside.PARTS_KEY] = len(pieces)
            parts.append(content)
        log.info("portal %s: log index %d split in %d", self.hex, message.log_index, len(parts))
        return parts

    async def _send_part(
        self,
        puppet: Ghost,
        message: Message,
        event_type: EventType,
        content: JSON,
        timestamp: int | None,
    ) -> EventID:
        mxid = self.room_mxid
        number = content.get(set_aside.PART_KEY, 0)
        content[LOG_INDEX_KEY] = message.log_index
        if self.row.encrypted and e2ee.manager(self.bridge) is not None:
            event_type, encrypted = await e2ee.encrypt(
                self.bridge, mxid, event_type, content, sender=puppet.mxid
            )
            # The log index (and part) in clear as well: _sent_before must find it without
            # decrypting.
            clear = {LOG_INDEX_KEY: message.log_index}
            for key in (set_aside.PART_KEY, set_aside.PARTS_KEY):
                if key in content:
                    clear[key] = content[key]
            content = JSON({**encrypted.serialize(), **clear})
        txn_id = f"kalandra-{self.hex}-{message.log_index}"
        try:
            # The ghost is in the room and may speak (messages need power level 0 in portals):
            # the plain client-server call, without the intent's join and power-level checks,
            # four state-store reads per message on the path that bounds the portal's rate.
            # No retries inside: each retry must look for the event first (see the module doc).
            return await ClientAPI.send_message_event(
                puppet.intent,
                mxid,
                event_type,
                content,
                txn_id=f"{txn_id}-part{number}" if number else txn_id,
                retry_count=0,
                timestamp=timestamp,
            )
        except Exception as exc:
            self._ghosts_in_room.discard(puppet.mxid)  # e.g. kicked meanwhile: rejoin, retry
            if isinstance(exc, MatrixConnectionError):
                self.bridge.run_state.catch_up.homeserver_unreachable()
            raise

    async def ghost(self, member_id: int) -> Ghost:
        """The member's ghost, registered and in the room (joined once per process)."""
        puppet = await self.bridge.puppets.get(member_id)
        if puppet.mxid not in self._ghosts_in_room:
            await puppet.ensure_ready()
            if await self._membership(puppet.mxid) == Membership.BAN:
                # A Matrix moderator's ban stands (ensure_joined would have the bot lift it):
                # what the ghost says is set aside (set_aside.py).
                raise MForbidden(403, "the ghost is banned from the portal")
            await puppet.intent.ensure_joined(self.room_mxid)
            self._ghosts_in_room.add(puppet.mxid)
        return puppet

    async def ghost_intent(self, member_id: int) -> IntentAPI:
        return (await self.ghost(member_id)).intent

    async def _sent_before(self, ghost: UserID, log_index: int) -> dict[int, EventID]:
        """The ghost's events for ``log_index`` that earlier attempts made, by part number:
        searched from the newest back to the first of the ghost's bridged messages with a lower
        log index, or until every part is found."""
        path = Path.v3.rooms[self.room_mxid].messages
        query = {
            "dir": "b",
            "limit": "100",
            "filter": json.dumps(
                {
                    "types": [
                        str(EventType.ROOM_MESSAGE),
                        str(EventType.ROOM_ENCRYPTED),
                        str(EventType.STICKER),
                    ],
                    "senders": [ghost],
                }
            ),
        }
        metrics.RESEND_LOOKUPS.inc()
        found: dict[int, EventID] = {}
        for _ in range(_LOOKBACK_PAGES):
            page = await self._bot.api.request(Method.GET, path, query_params=query)
            for event in page.get("chunk", []):
                content = event.get("content", {})
                index = content.get(LOG_INDEX_KEY)
                if not isinstance(index, int) or event.get("sender") != ghost:
                    continue
                if index < log_index:
                    return found
                part = content.get(set_aside.PART_KEY, 0)
                if index == log_index and isinstance(part, int):
                    log.info("portal %s: log index %d was sent before", self.hex, log_index)
                    found.setdefault(part, EventID(event["event_id"]))
                    if len(found) >= content.get(set_aside.PARTS_KEY, 1):
                        return found
            if not page.get("chunk") or not page.get("end"):
                return found
            query["from"] = page["end"]
        return found
