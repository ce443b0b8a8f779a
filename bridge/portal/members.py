"""Kalandra commits and moderation, mirrored in a portal's Matrix room (Kalandra -> Matrix).

Each commit updates the ``org.kalandra.epoch`` state event (sent by the bot, from the bot's own
MLS state as it stood right after that commit) and moves ghosts: an added native member's ghost
joins, a removed one's leaves. Kalandra Kick/Ban/Unban become the same action by the bot on the
ghost, or on the Matrix user whose puppet leaf was the target; a Redact redacts the bridged
Matrix event (by the ghost when the moderator redacts its own message, else by the bot).

Every action first reads the target's current membership (or the event's redaction) from the
homeserver and does nothing when Matrix already shows the outcome, so a change that came from
Matrix and returns through the Kalandra log is not applied twice, and an entry replayed after a
crash repeats nothing visible. Identical state events are not repeated by Synapse, and notices
and redactions carry transaction ids derived from (room, log index).

The bot itself and bridged Matrix users (puppet leaves) never get ghosts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.errors import MForbidden, MNotFound
from mautrix.types import (
    EventID,
    EventType,
    Membership,
    RoomID,
    TextMessageEventContent,
    UserID,
)
from mautrix.types import MessageType as MxMessageType

from kalandra_core.client import events as ev

from ..db import MessageTable
from ..db.progress import advance, bridged_mxid
from ..encryption import e2ee
from ..members.puppet import member_of, mxid_of
from ..routed import RosterCheck
from .base import PortalBase

if TYPE_CHECKING:
    from mautrix.appservice import IntentAPI

    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.portal")

EPOCH_EVENT = EventType.find("org.kalandra.epoch", EventType.Class.STATE)
_PRESENT = (Membership.JOIN, Membership.INVITE, Membership.KNOCK)


def epoch_content(
    epoch: int, tree_hash: bytes, cipher_suite: int, member_count: int
) -> dict[str, Any]:
    """The ``org.kalandra.epoch`` state: a member *count*, not the roster. The room's Matrix
    membership lists the members, and a 10,000-member roster (a few hundred KB of ids) in a
    state event sent at every commit would weigh on every client's sync and on Synapse."""
    return {
        "epoch": epoch,
        "tree_hash": tree_hash.hex(),
        "cipher_suite": cipher_suite,
        "member_count": member_count,
    }


class PortalMembers(PortalBase):
    # --- helpers -------------------------------------------------------------------------------

    @property
    def _bot(self) -> IntentAPI:
        return self.bridge.az.intent

    def is_native(self, member_id: int) -> bool:
        """A member that has a ghost: not the bot, not a bridged Matrix user."""
        return (
            member_id != self.bridge.bot.member_id
            and member_id not in self.bridge.bridged_users.member_ids
        )

    def _txn(self, log_index: int, what: str) -> str:
        return f"kalandra-{self.hex}-{log_index}-{what}"

    async def _membership(self, user: UserID) -> Membership:
        """The user's membership in the portal as the homeserver has it now."""
        path = Path.v3.rooms[self.room_mxid].state[str(EventType.ROOM_MEMBER)][user]
        try:
            content = await self._bot.api.request(Method.GET, path)
        except MNotFound:
            return Membership.LEAVE
        return Membership(content.get("membership", "leave"))

    async def _set_cached(self, user: UserID, membership: Membership) -> None:
        # Our own change, before the homeserver's transaction tells mautrix's state store:
        # ensure_joined (message sends) must not trust a stale "joined".
        await self._bot.state_store.set_membership(self.room_mxid, user, membership)

    async def _notice(self, text: str, txn_id: str) -> EventID:
        content = TextMessageEventContent(msgtype=MxMessageType.NOTICE, body=text)
        return await self._bot.send_message_event(
            self.room_mxid, EventType.ROOM_MESSAGE, content, txn_id=txn_id
        )

    async def advance(self, log_index: int, event_id: EventID | None) -> None:
        await advance(self.bridge.db, self.room_id, log_index, event_id)
        self.row.last_log_index = max(self.row.last_log_index, log_index)
        if event_id is not None:
            self.row.last_event_id = event_id

    # --- ghosts ----------------------------------------------------------------------------

    async def _ghost_join(self, member_id: int) -> None:
        puppet = await self.bridge.puppets.get(member_id)
        await puppet.ensure_ready()
        if await self._membership(puppet.mxid) != Membership.JOIN:
            await puppet.intent.ensure_joined(self.room_mxid, ignore_cache=True)

    async def _ghost_leave(self, ghost: UserID) -> None:
        membership = await self._membership(ghost)
        if membership in _PRESENT:
            await self._bot.user(ghost).leave_room(self.room_mxid)
        if membership != Membership.BAN:
            await self._set_cached(ghost, Membership.LEAVE)

    async def _invite_user(self, user: UserID) -> None:
        """The bot invites ``user`` unless they are in the portal or invited already; a
        refusal (banned in the room, an unknown user) is logged, not retried."""
        if await self._membership(user) in (Membership.JOIN, Membership.INVITE):
            return
        try:
            await self._bot.invite_user(self.room_mxid, user)
        except (MForbidden, MNotFound) as exc:
            log.warning("portal %s: invitation not sent (%s)", self.hex, exc.errcode)
            return
        await invited_by_bot(self.bridge, self.room_mxid)

    # --- commits -------------------------------------------------------------------------------

    async def _epoch_changed(self, event: ev.EpochChanged) -> None:
        for member_id in event.added:
            if self.is_native(member_id):
                await self._ghost_join(member_id)
        for member_id in event.removed:
            if self.is_native(member_id):
                await self._ghost_leave(mxid_of(self.bridge, member_id))
        content = epoch_content(
            event.epoch, event.tree_hash, event.cipher_suite, len(event.members)
        )
        event_id = await self._bot.send_state_event(self.room_mxid, EPOCH_EVENT, content)
        if self.bridge.config["bridge.epoch_notices"]:
            event_id = await self._notice(_epoch_line(event), self._txn(event.log_index, "epoch"))
        await self.advance(event.log_index, event_id)

    async def _roster_check(self, check: RosterCheck) -> None:
        """Ghosts of members no longer in the group leave, present members' ghosts join, and
        the epoch state is the group's."""
        present = {m for m in check.members if self.is_native(m)}
        joined = await self._bot.get_joined_members(self.room_mxid)
        for user in joined:
            member_id = member_of(self.bridge, user)
            if member_id is not None and member_id not in present:
                await self._ghost_leave(user)
        for member_id in sorted(present):
            if mxid_of(self.bridge, member_id) not in joined:
                await self._ghost_join(member_id)
        content = epoch_content(
            check.epoch, check.tree_hash, check.cipher_suite, len(check.members)
        )
        # Sent only if it differs: a read costs the homeserver far less than a new state event,
        # and a start-up checks every portal.
        if await self._epoch_state() != content:
            await self._bot.send_state_event(self.room_mxid, EPOCH_EVENT, content)

    async def _epoch_state(self) -> dict[str, Any]:
        path = Path.v3.rooms[self.room_mxid].state[str(EPOCH_EVENT)][""]
        try:
            return dict(await self._bot.api.request(Method.GET, path))
        except MNotFound:
            return {}

    # --- moderation ----------------------------------------------------------------------------

    async def _moderated(self, event: ev.Moderated) -> None:
        event_id = None
        if event.action == "redact":
            event_id = await self._redact(event)
        elif event.target != self.bridge.bot.member_id:  # the bot's own removal: Left follows
            target = await self._target(event.target)
            if target is not None:
                await self._moderate(event.action, target, event.reason)
        await self.advance(event.log_index, event_id)

    async def _target(self, member_id: int) -> UserID | None:
        if member_id in self.bridge.bridged_users.member_ids:
            return await bridged_mxid(self.bridge.db, member_id)
        return mxid_of(self.bridge, member_id)

    async def _moderate(self, action: str, target: UserID, reason: str) -> None:
        membership = await self._membership(target)
        room = self.room_mxid
        if action == "kick":
            if membership in _PRESENT:
                await self._bot.kick_user(room, target, reason)
                await self._set_cached(target, Membership.LEAVE)
        elif action == "ban":
            if membership != Membership.BAN:
                await self._bot.ban_user(room, target, reason)
                await self._set_cached(target, Membership.BAN)
        elif action == "unban" and membership == Membership.BAN:
            await self._bot.unban_user(room, target, reason)
            await self._set_cached(target, Membership.LEAVE)

    async def _redact(self, event: ev.Moderated) -> EventID | None:
        """Redact the Matrix event of a bridged message; None when there is nothing to do."""
        room = self.room_mxid
        target = await MessageTable(self.bridge.db).event_for(self.room_id, event.target)
        if target is None:
            return None  # never bridged (before the portal, or not a message)
        try:
            original = await self._bot.api.request(Method.GET, Path.v3.rooms[room].event[target])
        except MNotFound:
            return None
        if "redacted_because" in (original.get("unsigned") or {}):
            return None  # redacted in Matrix already (where this redaction came from)
        content: dict[str, Any] = {"reason": event.reason} if event.reason else {}
        redactors = [self._bot]
        if original.get("sender") == mxid_of(self.bridge, event.moderator_id):
            redactors.insert(0, self._bot.user(original["sender"]))
        for number, intent in enumerate(redactors):
            path = Path.v3.rooms[room].redact[target][self._txn(event.log_index, f"r{number}")]
            try:
                response = await intent.api.request(Method.PUT, path, content=content)
            except MForbidden:
                if intent is redactors[-1]:
                    raise
                continue  # the ghost may have left the room since: the bot redacts
            return EventID(response["event_id"])
        return None  # not reached

    # --- the bot's own room state ------------------------------------------------------------

    async def _left(self, event: ev.Left) -> None:
        log.warning("portal %s: the bot is no longer in the Kalandra room", self.hex)
        if self.bridge.config["bridge.delivery_error_reports"]:
            await self._notice(
                "The bridge is no longer a member of this Kalandra room: nothing more is bridged.",
                self._txn(self.row.last_log_index, "left"),
            )

    async def _undecryptable(self, event: ev.Undecryptable) -> None:
        log.warning("portal %s: log index %d undecryptable", self.hex, event.log_index)
        if event.log_index < 0:
            return
        event_id = None
        if self.bridge.config["bridge.delivery_error_reports"]:
            event_id = await self._notice(
                f"A Kalandra message (log index {event.log_index}) could not be decrypted.",
                self._txn(event.log_index, "undecryptable"),
            )
        await self.advance(event.log_index, event_id)


def _epoch_line(event: ev.EpochChanged) -> str:
    line = f"Kalandra epoch {event.epoch}"
    changes = []
    if event.added:
        changes.append("added " + ", ".join(str(m) for m in event.added))
    if event.removed:
        changes.append("removed " + ", ".join(str(m) for m in event.removed))
    return f"{line} ({'; '.join(changes)})" if changes else line


async def invited_by_bot(bridge: BridgeContext, room: RoomID) -> None:
    """After the bot's own invitation: a new Megolm session for the room's next message, which
    the invitee gets too. mautrix starts one on every membership change, but takes the member
    event of an invitation its intent made for a duplicate (the intent cached the membership
    first), so the invitee would never get the key of the current session."""
    await e2ee.discard_outbound_session(bridge, room)
