"""A portal's queue toward Kalandra: messages, joins, leaves, kicks, bans and redactions of the
Matrix room, in the order Synapse delivered them, each done before the next.

Every Matrix event of a portal gets its place in the queue when its appservice transaction is
dispatched (:meth:`PortalToKalandra.reserve`, see appservice/transactions.py), before mautrix's
handler runs, so the order holds whatever the handlers' timing; the handler fills the place with
the work (or nothing), and the transaction is acknowledged once every place is done: the event
sequenced in Kalandra and recorded (room + log index <-> event id), or recorded as failed after its
status event and notice were sent. Events already handled (a replayed transaction) are recognised
in the database and skipped.

Messages of users with the ``user`` permission go out as their own MLS leaf
(members/bridged_users.py); of users with only ``relay``, through the bot's leaf when the portal
has relaying on (convert/relay.py), else they fail visibly.

Tests only: ``KALANDRA_TEST_RECORD_LAG`` (seconds) delays recording a Matrix message once it is
sequenced in Kalandra, so a test can kill the bridge in between, deterministically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import os
from typing import TYPE_CHECKING

from mautrix.types import (
    EventID,
    Format,
    LocationMessageEventContent,
    MediaMessageEventContent,
    MessageEventContent,
    MessageStatusReason,
    TextMessageEventContent,
    UserID,
)

from kalandra_core.backoff import Backoff
from kalandra_core.client.content import Content
from kalandra_core.client.profile import Profile, with_profile
from kalandra_core.storage.reachable import through_outage

from .. import access
from ..convert.formatting import formatted_message
from ..convert.relay import relay_content
from ..db import BridgedUserTable, DedupeTable, MessageTable, PortalRow
from ..encryption import e2ee
from ..members.bot_send import bot_send
from ..portal_work import CURRENT_SLOT, EventSlot, FromMatrix
from . import admission, ephemeral, errors, media, relations, room_metadata
from .base import PortalBase
from .redaction_power import check_redaction
from .statuses import Refused, StatusSender
from .to_matrix import KINDS

if TYPE_CHECKING:
    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.portal")

_MX_KINDS = {v: k for k, v in KINDS.items()}
_MAX_DELAY = 15.0
_MESSAGES = frozenset({"message", "undecryptable", "unencrypted"})  # (get status events)
_RECORD_LAG = float(os.environ.get("KALANDRA_TEST_RECORD_LAG", "0") or 0)  # tests only

UNENCRYPTED = (
    "this bridge requires encryption (bridge.encryption.require): the message was sent"
    " unencrypted and nothing of it went to Kalandra."
)
RELAY_REFUSAL = (
    "you need the `user` permission to speak in Kalandra rooms, or a bridge admin must turn"
    " relaying on in this room (`set-relay`)."
)


def kalandra_content(content: MessageEventContent) -> Content | None:
    """m.room.message text/notice/emote as a Kalandra body (HTML sanitized, convert/formatting.py;
    a
    reply's quoted fallback dropped), a location as text; None otherwise. Relations and mentions:
    relations.py."""
    if isinstance(content, LocationMessageEventContent):
        return Content(body=f"Location: {content.geo_uri or ''}".rstrip())
    if not isinstance(content, TextMessageEventContent):
        return None
    kind = _MX_KINDS.get(content.msgtype)
    if kind is None:
        return None
    content.trim_reply_fallback()
    html = content.formatted_body if content.format == Format.HTML else None
    body, formatted = formatted_message(content.body, html)  # sanitized
    return Content(body=body, kind=kind, formatted_body=formatted)


class PortalToKalandra(PortalBase):
    def __init__(self, bridge: BridgeContext, row: PortalRow) -> None:
        super().__init__(bridge, row)
        self.outgoing: asyncio.Queue[EventSlot] = asyncio.Queue()
        self._places = itertools.count(1)
        self.mx_status = StatusSender(bridge, self.hex, lambda: self.row.encrypted)
        self._out_task: asyncio.Task[None] | None = None

    def _start_to_kalandra(self) -> None:
        if self._out_task is None:
            self._out_task = asyncio.create_task(self._run_out(), name=f"portal-out-{self.hex}")
        self.mx_status.start()

    def _stop_to_kalandra(self) -> None:
        if self._out_task is not None:
            self._out_task.cancel()
            self._out_task = None
        self.mx_status.stop()

    # --- what the Matrix side hands in ---------------------------------------------------------

    def reserve(self, event_id: EventID) -> EventSlot:
        slot = EventSlot(event_id, next(self._places))
        self.outgoing.put_nowait(slot)
        return slot

    def submit(self, work: FromMatrix) -> EventSlot:
        """Queue ``work``: in the place reserved for its event, else at the end. Its slot
        (``done`` once the work is handled for good)."""
        slot = CURRENT_SLOT.get()
        if slot is None or slot.event_id != work.event_id or slot.work.done():
            slot = self.reserve(work.event_id)
        slot.fill(work)
        if work.kind in _MESSAGES and self.row.mxid is not None:
            self.mx_status.watch(self.row.mxid, work.event_id)
        return slot

    # --- the queue -------------------------------------------------------------------------------

    async def _run_out(self) -> None:
        while True:
            slot = await self.outgoing.get()
            try:
                work = await slot.work
                if work is not None:
                    await self._mx_handle(work)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not even recorded: the transaction is retried
                log.warning(
                    "portal %s: a Matrix event was not handled (%s)", self.hex, type(exc).__name__
                )
                if not slot.done.done():
                    slot.done.set_exception(exc)
            else:
                if not slot.done.done():
                    slot.done.set_result(None)

    async def _mx_handle(self, work: FromMatrix) -> None:
        """Handle ``work`` once; an outage of the bridge's database is waited out, however
        long (the work is then tried again from its start: a message that reached Kalandra
        is recognised there by its send mark and not sent twice)."""
        what = f"portal {self.hex}: a Matrix {work.kind}"
        await through_outage(functools.partial(self._mx_handle_once, work), what, log)

    async def _mx_handle_once(self, work: FromMatrix) -> None:
        dedupe = DedupeTable(self.bridge.db)
        if await dedupe.event_seen(work.event_id):
            if await dedupe.failure(work.event_id) != e2ee.HELD:
                self.mx_status.forget(work.event_id)  # its final status went out before
                return  # handled before (a replayed transaction)
            # Held for its target (e2ee.hold): handled now, or held again.
            await dedupe.forget(work.event_id, e2ee.HELD)
            work = dataclasses.replace(work, held=True)
        mxid = self.row.mxid
        assert mxid is not None
        backoff, attempt = Backoff(cap=_MAX_DELAY), 0
        while True:
            attempt += 1
            try:
                await self._mx_apply(work)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error, decision = exc, errors.verdict(exc, attempt)
            if isinstance(decision, errors.Fail):
                await self._mx_fail(work, decision.refusal)
                return
            if isinstance(decision, errors.Hold):
                await dedupe.record_done(work.event_id, e2ee.HELD)  # (see e2ee.resume_key_waits)
                return
            if isinstance(decision, errors.Queued):
                # Queued in the bot's outbox, delivered once: never sent a second time.
                log.warning("portal %s: %s queued, not confirmed yet", self.hex, work.kind)
                await dedupe.record_done(work.event_id)
                if work.kind == "message":  # (it goes out: a PENDING must not stay the last)
                    self.mx_status.success(mxid, work.event_id)
                return
            if isinstance(decision, errors.WaitOut):
                raise error  # waited out by _mx_handle
            await self._mx_wait_retry(work, error, backoff.next())
        if work.kind == "message":
            self.mx_status.success(mxid, work.event_id)
        else:
            await dedupe.record_done(work.event_id)

    async def _mx_wait_retry(self, work: FromMatrix, exc: Exception, delay: float) -> None:
        log.warning(
            "portal %s: %s not bridged yet (%s); retrying",
            self.hex,
            work.kind,
            type(exc).__name__,
        )
        await asyncio.sleep(delay)

    async def _mx_fail(self, work: FromMatrix, refusal: Refused) -> None:
        mxid = self.row.mxid
        assert mxid is not None
        log.info(
            "portal %s: a Matrix %s was not bridged (%s)", self.hex, work.kind, refusal.reason
        )
        message = work.kind in _MESSAGES or work.held
        await self.mx_status.failure(mxid, work.event_id, refusal, message=message)
        await DedupeTable(self.bridge.db).record_done(work.event_id, refusal.reason.value)

    # --- each kind -------------------------------------------------------------------------------

    async def _mx_apply(self, work: FromMatrix) -> None:
        if work.kind in ("message", "reaction", "meta"):
            await admission.check_sender(self.face, work)
        if work.kind == "message":
            await self._mx_message(work)
        elif work.kind == "join":
            # Let in (access.py) or kicked; only `user` and `admin` get an MLS leaf.
            admitted = await admission.admit_join(self.face, work)
            if admitted and work.permission in ("user", "admin"):
                user = await self.bridge.bridged_users.get(work.sender, work.permission)
                await user.ensure_in_room(self.room_id)
        elif work.kind == "invite":
            await admission.matrix_invite(self.face, work)
        elif work.kind == "leave":
            await self._mx_remove_bridged(work)
        elif work.kind in ("kick", "ban", "unban"):
            assert work.member_id is not None
            client = self.bridge.bot.client
            assert client is not None
            await client.moderate(self.room_id, work.kind, work.member_id, work.reason)
        elif work.kind == "redact":
            await self._mx_redact(work)
        elif work.kind == "reaction":
            await relations.reaction_to_kalandra(self.face, work)
        elif work.kind == "meta":
            await room_metadata.meta_to_kalandra(self.face, work)
        elif work.kind == "undecryptable":  # encryption/e2ee.py: ``reason`` says why
            raise Refused(MessageStatusReason.UNDECRYPTABLE, work.reason)
        elif work.kind == "unencrypted":  # appservice/handler.py, with bridge.encryption.require
            raise Refused(MessageStatusReason.UNSUPPORTED, work.reason)

    async def _mx_message(self, work: FromMatrix) -> None:
        assert work.content is not None
        mxid = self.row.mxid
        assert mxid is not None
        if await relations.held_for_target(
            self.face, work, await relations.unbridged_target(self.face, work)
        ):
            raise relations.Held  # a reply or edit follows its target
        if media.is_media(work.content):
            relayed = work.permission == "relay" and self.row.relay_enabled
            if work.permission not in ("user", "admin") and not relayed:
                raise Refused(MessageStatusReason.NO_PERMISSION, RELAY_REFUSAL)  # (no download)
            assert isinstance(work.content, MediaMessageEventContent)
            body: Content | None = await media.to_kalandra(self.face, work.content)
        else:
            body = kalandra_content(work.content)
        if body is None:
            kind = str(getattr(work.content, "msgtype", None) or "this kind of message")
            raise Refused(
                MessageStatusReason.UNSUPPORTED, f"{kind} is not supported by the bridge yet."
            )
        body = await relations.from_matrix(self.face, work.content, body)
        if work.permission in ("user", "admin"):
            user = await self.bridge.bridged_users.get(work.sender, work.permission)
            body = with_profile(body, await self.profile(work.sender))
            index = await user.send(self.room_id, body, work.event_id)
        elif work.permission == "relay" and self.row.relay_enabled:
            index = await self._mx_relay(work, body)
        else:
            raise Refused(MessageStatusReason.NO_PERMISSION, RELAY_REFUSAL)
        if _RECORD_LAG:  # tests only (see the module's docstring)
            await asyncio.sleep(_RECORD_LAG)
        await MessageTable(self.bridge.db).record_to_kalandra(
            self.room_id, index, mxid, work.event_id
        )
        if self.bridge.config["bridge.delivery_receipts"]:
            await ephemeral.delivered_to_kalandra(self.bridge, mxid, work.event_id)

    async def _displayname(self, sender: UserID) -> str | None:
        """The sender's display name in the portal (None: none, or not known)."""
        mxid = self.row.mxid
        assert mxid is not None
        try:
            member = await self.bridge.az.intent.get_room_member_info(mxid, sender)
        except Exception as exc:  # the name is a nicety: the MXID or localpart stands in
            log.debug("portal %s: no member info (%s)", self.hex, type(exc).__name__)
            return None
        return member.displayname if member is not None and member.displayname else None

    async def profile(self, sender: UserID) -> Profile:
        """Who a bridged Matrix user is, for the native members (client/profile.py): carried
        by each message their member sends."""
        return Profile(displayname=await self._displayname(sender), mxid=sender)

    async def _mx_relay(self, work: FromMatrix, body: Content) -> int:
        """Through the bot's own leaf, the sender named in the text."""
        assert work.content is not None
        name = await self._displayname(work.sender)
        content = dataclasses.replace(
            relay_content(self.bridge.config, work.sender, name, body),
            reply_to=body.reply_to,
            edit_of=body.edit_of,
            extra=body.extra,
            media=body.media,
        )
        return await bot_send(self.bridge, self.room_id, content, work.event_id)

    async def _mx_remove_bridged(self, work: FromMatrix) -> None:
        assert work.target is not None
        await access.revoke(self.bridge, self.room_id, work.target)  # a new invitation needed
        user = self.bridge.bridged_users.find(work.target)
        member_id = user.member_id if user is not None else None
        if member_id is None:
            key = self.bridge.config.mls_state_key
            assert key is not None
            row = await BridgedUserTable(self.bridge.db, key).get(work.target)
            member_id = None if row is None else row.member_id
        bot = self.bridge.bot
        if member_id is None or bot.client is None:
            return  # never a Kalandra member
        async with bot.commit_lock:
            room = bot.core.rooms.get(self.room_id)
            if room is None or not room.active or member_id not in room.roster():
                return
            index = await bot.client.remove(self.room_id, [member_id])
            await bot.state.flush()
        log.info("portal %s: bridged member %d removed (log index %d)", self.hex, member_id, index)

    async def _mx_redact(self, work: FromMatrix) -> None:
        assert work.redacts is not None
        mxid = self.row.mxid
        assert mxid is not None
        found = await MessageTable(self.bridge.db).index_for(mxid, work.redacts)
        if found is None or found[0] != self.room_id:
            if await e2ee.hold(self.face, work.redacts, work):
                raise relations.Held  # redacted once it is bridged
            return  # not a bridged message (or never bridged: nothing to erase)
        await check_redaction(self.bridge, mxid, work.sender, work.redacts)
        if await relations.unreact(self.face, work, found[1]):
            return  # a bridged user took their reaction off
        client = self.bridge.bot.client
        assert client is not None
        await client.moderate(self.room_id, "redact", found[1], work.reason)
