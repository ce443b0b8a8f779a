"""What the sender of a Matrix event learns about its way to Kalandra: status events
(com.beeper.message_send_status, as mautrix bridges send them) for every message that could not
be bridged (``bridge.message_status_events``) and, if asked, for every bridged one
(``bridge.message_status_success``), and a notice explaining a failure
(``bridge.delivery_error_reports``).

The semantics are Beeper's: PENDING while the bridge still works on a message, then one final
status: SUCCESS, FAIL_RETRIABLE (sending it again may work: the Kalandra server did not answer,
an internal error, a missing room key) or FAIL_PERMANENT (it never will: not allowed, not
supported, too large), each failure with ``reason`` and a readable ``message``. A message still
waiting after ``PENDING_AFTER`` seconds (its portal busy with earlier events, the Kalandra server
or the bridge's database being retried) gets one PENDING status, within a bridge-wide budget
(``PENDING_RATE``: when everything waits, a status for each message would add to the load on
what is behind); its final status then always follows, SUCCESS included whatever
``message_status_success`` says, so no client is left showing it in progress.

Successes are sent by a background task of the portal (they must not slow its queue down; one
lost in a crash is harmless). A message reported failed and bridged later (its room key came
late: encryption/e2ee.py) is corrected: the bot's failure reports about it (the notice refers to
the event with an ``m.reference``, kept in clear when encrypted, so they are found by its relations
after a restart too) are redacted, and a success status follows whatever ``message_status_success``
says, so the last status of each event is its outcome.

Failures are sent before the event is recorded as failed, with transaction ids derived from the
event id, so a replay repeats rather than duplicates them. In encrypted portals both are
encrypted by the bot's device (mautrix's appservice intent sends what it is given as it is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from mautrix.api import Method, Path
from mautrix.errors import MatrixStandardRequestError
from mautrix.types import (
    BeeperMessageStatusEventContent,
    EventContent,
    EventID,
    EventType,
    MessageStatus,
    MessageStatusReason,
    MessageType,
    RelatesTo,
    RelationType,
    RoomID,
    TextMessageEventContent,
)

from kalandra_core.backoff import Backoff
from kalandra_core.server.ratelimit import TokenBucket

from .. import metrics
from ..encryption import e2ee

if TYPE_CHECKING:
    from ..context import BridgeContext
    from ..run_state import RunState

log = logging.getLogger("kalandra.bridge.status")

NETWORK = "kalandra"


PENDING_AFTER = 2.0  # seconds a message waits before its sender is told it is in progress
# PENDING statuses per second, bridge-wide, and their burst. Each costs the homeserver an event,
# and its SUCCESS another: when everything waits (the homeserver or the Kalandra server slow),
# a PENDING for every message would triple the load on what is already behind. Past the
# budget a message gets no PENDING (and so no SUCCESS it would otherwise not get).
PENDING_RATE = 2.0
PENDING_BURST = 20


def pending_allowed(run_state: RunState, now: float) -> bool:
    """Whether the bridge-wide budget has room for one more PENDING status now."""
    if run_state.pending_statuses is None:
        run_state.pending_statuses = TokenBucket(PENDING_RATE, PENDING_BURST, now)
    return run_state.pending_statuses.take(now) == 0.0


class Refused(Exception):
    """A Matrix event that will not reach Kalandra, for a reason its sender should read.
    ``retriable``: sending it again may work (FAIL_RETRIABLE); by default only what could
    not be decrypted (its room key may come: sent again, it is readable)."""

    def __init__(
        self, reason: MessageStatusReason, text: str, *, retriable: bool | None = None
    ) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text
        if retriable is None:
            retriable = reason == MessageStatusReason.UNDECRYPTABLE
        self.retriable = retriable

    @property
    def status(self) -> MessageStatus:
        return MessageStatus.RETRIABLE if self.retriable else MessageStatus.FAIL


class StatusSender:
    def __init__(
        self, bridge: BridgeContext, label: str, encrypted: Callable[[], bool] = lambda: True
    ) -> None:
        """``encrypted``: whether the portal is encrypted, as the bridge knows it without a
        database query (for PENDING statuses)."""
        self.bridge = bridge
        self.label = label
        self._encrypted = encrypted
        self._successes: asyncio.Queue[tuple[RoomID, EventID, bool, _Pending | None]] = (
            asyncio.Queue()
        )
        self.late: set[EventID] = set()  # reported failed, being bridged late (encryption/e2ee.py)
        self._pending: dict[EventID, _Pending] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.bridge.config["bridge.message_status_events"])

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"status-{self.label}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for pending in self._pending.values():
            pending.task.cancel()
        self._pending.clear()

    def watch(self, room: RoomID, event_id: EventID) -> None:
        """``event_id`` (a message) is in the portal's queue: a PENDING status goes out if it
        has no final one within ``PENDING_AFTER`` seconds (not for a message already reported
        failed and bridged late: its success follows, the failure withdrawn)."""
        if not self.enabled or event_id in self._pending or event_id in self.late:
            return
        pending = _Pending()
        pending.task = asyncio.create_task(
            self._send_pending(room, event_id, pending), name=f"pending-{self.label}"
        )
        self._pending[event_id] = pending

    async def _send_pending(self, room: RoomID, event_id: EventID, pending: _Pending) -> None:
        await asyncio.sleep(PENDING_AFTER)
        if not pending_allowed(self.bridge.run_state, time.monotonic()):
            log.debug("portal %s: pending status skipped (over the budget)", self.label)
            return  # as if it had not been due: no final status is owed for it
        pending.sent = True  # from here on the final status waits for this one
        backoff = Backoff(cap=5.0)
        while True:  # (the homeserver or, in encrypted portals, the database may be away)
            try:
                await self._status(room, event_id, MessageStatus.PENDING, direct=True)
                return
            except Exception as exc:
                log.debug(
                    "portal %s: pending status not sent (%s)", self.label, type(exc).__name__
                )
                if pending.settled:
                    return  # its final status is due: it says more
            await backoff.pause()

    def forget(self, event_id: EventID) -> None:
        """No status is due for ``event_id`` (handled before: a replayed transaction)."""
        self._settle(event_id)

    def _settle(self, event_id: EventID) -> _Pending | None:
        """The event's final status is decided: its PENDING, if it went out (to be awaited
        before the final one), else None (a PENDING not due yet is called off)."""
        pending = self._pending.pop(event_id, None)
        if pending is None:
            return None
        pending.settled = True
        if not pending.sent:
            pending.task.cancel()
            return None
        return pending

    @property
    def success_enabled(self) -> bool:
        return self.enabled and bool(self.bridge.config["bridge.message_status_success"])

    def success(self, room: RoomID, event_id: EventID) -> None:
        metrics.bridged_to_kalandra(event_id)
        corrected = event_id in self.late
        self.late.discard(event_id)
        pending = self._settle(event_id)
        if self.success_enabled or corrected or pending is not None:
            self._successes.put_nowait((room, event_id, corrected, pending))

    async def _run(self) -> None:
        while True:
            room, event_id, corrected, pending = await self._successes.get()
            try:
                if pending is not None:
                    await pending.done()
                if corrected:
                    await self._withdraw_failure(room, event_id)
                if self.enabled:
                    await self._status(room, event_id, MessageStatus.SUCCESS)
            except Exception as exc:
                log.debug(
                    "portal %s: success status not sent (%s)", self.label, type(exc).__name__
                )

    async def failure(
        self, room: RoomID, event_id: EventID, refusal: Refused, *, message: bool
    ) -> None:
        """A status event (for messages) and a notice; best effort, a few attempts each."""
        metrics.failed_to_kalandra(event_id, refusal.reason.value)
        pending = self._settle(event_id)
        if pending is not None:
            await pending.done()
        reference: RelatesTo | None = RelatesTo(rel_type=RelationType.REFERENCE, event_id=event_id)
        status_sent = not (message and self.enabled)
        for attempt in range(3):
            try:
                if not status_sent:
                    # Refused for good (see below): the notice still says it.
                    with contextlib.suppress(MatrixStandardRequestError):
                        await self._status(room, event_id, refusal.status, refusal)
                    status_sent = True
                if self.bridge.config["bridge.delivery_error_reports"]:
                    notice = TextMessageEventContent(
                        msgtype=MessageType.NOTICE,
                        body=f"Not bridged to Kalandra: {refusal.text}",
                        relates_to=reference,
                    )
                    await self._send(
                        room, EventType.ROOM_MESSAGE, notice, f"kalandra-fail-{event_id}"
                    )
                return
            except MatrixStandardRequestError as exc:
                # The homeserver refused the notice itself: a reference to an event it does
                # not hold (a remote event it never stored) is refused, so say it without one.
                log.warning(
                    "portal %s: failure report refused (%s)", self.label, type(exc).__name__
                )
                reference = None
            except Exception as exc:
                log.warning(
                    "portal %s: failure report not sent (%s)", self.label, type(exc).__name__
                )
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _withdraw_failure(self, room: RoomID, event_id: EventID) -> None:
        """Redact the bot's failure notice and status events about ``event_id``."""
        bot = self.bridge.az.bot_mxid
        path = Path.v1.rooms[room].relations[event_id]
        query = {"limit": "50"}
        answer = await self.bridge.az.intent.api.request(Method.GET, path, query_params=query)
        for related in answer.get("chunk", []):
            if related.get("sender") != bot or related.get("unsigned", {}).get("redacted_because"):
                continue
            await self.bridge.az.intent.redact(
                room, related["event_id"], reason="bridged after all"
            )

    async def _status(
        self,
        room: RoomID,
        event_id: EventID,
        status: MessageStatus,
        refusal: Refused | None = None,
        *,
        direct: bool = False,
    ) -> None:
        content = BeeperMessageStatusEventContent(
            network=NETWORK,
            relates_to=RelatesTo(rel_type=RelationType.REFERENCE, event_id=event_id),
            status=status,
            reason=None if refusal is None else refusal.reason,
            error=None if refusal is None else refusal.reason.value,
            message=None if refusal is None else refusal.text,
        )
        # Per status: a replay repeats each one rather than adding another.
        txn_id = f"kalandra-status-{status.value}-{event_id}"
        if direct and not self._encrypted():
            # Straight to the homeserver: the intent's own checks read the bridge's database,
            # which may be what the message waits for.
            path = Path.v3.rooms[room].send[str(EventType.BEEPER_MESSAGE_STATUS)][txn_id]
            await self.bridge.az.intent.api.request(Method.PUT, path, content.serialize())
            return
        await self._send(room, EventType.BEEPER_MESSAGE_STATUS, content, txn_id)

    async def _send(
        self,
        room: RoomID,
        event_type: EventType,
        content: TextMessageEventContent | BeeperMessageStatusEventContent,
        txn_id: str,
    ) -> None:
        sent: EventContent = content
        if e2ee.manager(self.bridge) is not None and await e2ee.room_is_encrypted(
            self.bridge, room
        ):
            event_type, encrypted = await e2ee.encrypt(self.bridge, room, event_type, content)
            sent = cast("EventContent", encrypted)
        await self.bridge.az.intent.send_message_event(room, event_type, sent, txn_id=txn_id)


class _Pending:
    """A PENDING status due for an event: ``sent`` once it is being sent."""

    __slots__ = ("sent", "settled", "task")

    def __init__(self) -> None:
        self.sent = False
        self.settled = False  # the event's final status is due
        self.task: asyncio.Task[None]

    async def done(self) -> None:
        if not self.task.done():
            await asyncio.wait([self.task])  # (its outcome, even a cancellation, is not ours)
