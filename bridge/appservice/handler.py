"""Matrix events in: the bot's invites and commands, and what happens in portals (messages,
joins, leaves, kicks, bans, redactions), handed to the portal's queue toward Kalandra."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from mautrix.bridge import BaseMatrixHandler, BaseUser
from mautrix.types import (
    EncryptedEvent,
    Event,
    EventID,
    EventType,
    Membership,
    MessageEvent,
    MessageEventContent,
    MessageStatus,
    MessageStatusReason,
    PresenceEvent,
    ReactionEvent,
    ReceiptEvent,
    RedactionEvent,
    RoomEncryptionStateEventContent,
    RoomID,
    StateEvent,
    TypingEvent,
    UserID,
)

from ..commands import REFUSAL, KalandraCommandProcessor
from ..db import DedupeTable
from ..encryption import e2ee
from ..matrix_users import MatrixUsers
from ..members.puppet import member_of
from ..portal import room_metadata
from ..portal.ephemeral import MatrixEphemeral
from ..portal.to_kalandra import UNENCRYPTED
from ..portal_work import FromMatrix, release_slot

if TYPE_CHECKING:
    from mautrix.bridge import Bridge

    from ..context import BridgeContext


ENCRYPTION_OFF = (
    "This message is encrypted and the bridge cannot read it: end-to-bridge encryption is off"
    " in the bridge's config. Write to me in a room without encryption, or ask the bridge's"
    " operator to set `bridge.encryption.allow: true` in its config and restart it (its"
    " Synapse needs `msc2409_to_device_messages_enabled` and"
    " `msc3202_transaction_extensions` under `experimental_features`; see"
    " example-config.yaml)."
)


class MatrixHandler(BaseMatrixHandler):
    def __init__(self, bridge: BridgeContext) -> None:
        prefix, _, suffix = bridge.config["bridge.username_template"].partition("{userid}")
        self.user_id_prefix = f"@{prefix}"
        self.user_id_suffix = f"{suffix}:{bridge.config['homeserver.domain']}"
        self.context = bridge
        self.users = MatrixUsers(bridge)
        # The process is mautrix's Bridge as well, which mautrix's handler is typed for.
        super().__init__(
            command_processor=KalandraCommandProcessor(bridge), bridge=cast("Bridge", bridge)
        )
        self.ephemeral = MatrixEphemeral(bridge)
        # bridge.encryption.require is about portals (handle_message; reactions:
        # _refused_in_clear): mautrix would drop unencrypted messages everywhere, the bot's
        # direct chats included, and its portal path is ours, which would not check at all.
        self.require_portal_e2ee = self.require_e2ee
        self.require_e2ee = False

    async def int_handle_event(self, evt: Event, was_encrypted: bool = False) -> None:
        # Whatever path the event takes, its place in a portal's queue is released at the end
        # if nothing claimed it (transactions.py waits for it).
        try:
            if not was_encrypted and self._refused_in_clear(evt):
                return
            await super().int_handle_event(evt, was_encrypted)
        finally:
            release_slot()

    def _refused_in_clear(self, evt: Event) -> bool:
        """With bridge.encryption.require, a reaction sent in clear in a portal is refused
        like a message (handle_message); mautrix's reaction path does not know how it came."""
        if not self.require_portal_e2ee or evt.type != EventType.REACTION:
            return False
        portal = self.context.portals.by_mxid(evt.room_id)
        sender = evt.sender
        if portal is None or sender == self.az.bot_mxid or self.context.is_bridge_ghost(sender):
            return False
        portal.submit(FromMatrix("unencrypted", sender, evt.event_id, reason=UNENCRYPTED))
        return True

    async def _send_mss(
        self,
        evt: Event,
        status: MessageStatus,
        reason: MessageStatusReason | None = None,
        error: str | None = None,
        message: str | None = None,
    ) -> None:
        """mautrix would mark every command and management-room message delivered, even in a
        room the bot has just left; bridged messages get theirs from portal/statuses.py. Its
        failure statuses (undecryptable events) stay, best effort."""
        if status == MessageStatus.SUCCESS:
            return
        try:
            await super()._send_mss(evt, status, reason, error, message)
        except Exception as exc:
            self.log.debug("status event not sent: %s", type(exc).__name__)

    # mautrix drops messages and commands of users without permission silently; we let them
    # through to the command processor, which answers with a refusal, and to the portal, which
    # relays them or says why not.
    async def allow_message(self, user: BaseUser) -> bool:
        return True

    @staticmethod
    async def allow_command(user: BaseUser) -> bool:
        return True

    async def handle_message(self, evt: MessageEvent, was_encrypted: bool = False) -> None:
        """Portal messages go to the portal's queue toward Kalandra; the rest (commands,
        management rooms) is mautrix's."""
        portal = self.context.portals.by_mxid(evt.room_id)
        sender = evt.sender
        if not isinstance(evt.content.get("body"), str):
            # Redacted before Synapse sent it (a replayed transaction): nothing left to bridge.
            return
        if portal is not None and not was_encrypted and self.require_portal_e2ee:
            if sender == self.az.bot_mxid or self.context.is_bridge_ghost(sender):
                return
            # Refused in its place in the queue (status event, notice), commands too.
            portal.submit(FromMatrix("unencrypted", sender, evt.event_id, reason=UNENCRYPTED))
            return
        if portal is None or self.is_command(evt.content)[0]:
            release_slot()  # a command may take long: the transaction does not wait for it
            if portal is None and await self._nothing_to_answer(evt):
                return
            if portal is not None and not await DedupeTable(self.context.db).claim_event(
                evt.event_id
            ):
                return  # answered before (a replay, or caught up again): once or never
            await super().handle_message(evt, was_encrypted)
            return
        if sender == self.az.bot_mxid or self.context.is_bridge_ghost(sender):
            return  # our own ghosts and bot: never bridged back (no echo loop)
        user = self.users.get(sender)
        portal.submit(FromMatrix("message", sender, evt.event_id, user.level, content=evt.content))

    async def _nothing_to_answer(self, evt: MessageEvent) -> bool:
        """A message outside portals that nobody is to answer: from the bridge's own users
        (ghosts never command the bridge), or in a room the bot is not in (a ghost's room that
        is no portal). mautrix would look up the room's members and report each one "Unknown
        room" after trying to join: a few requests per message, which a busy room of a ghost's
        would spend on the connections every portal sends through. Invited: mautrix joins to
        answer, as before."""
        sender = evt.sender
        if sender == self.az.bot_mxid or self.context.is_bridge_ghost(sender):
            return True
        membership = await self.az.state_store.get_membership(evt.room_id, self.az.bot_mxid)
        return membership not in (Membership.JOIN, Membership.INVITE)

    async def handle_join(self, room_id: RoomID, user_id: UserID, event_id: EventID) -> None:
        """Every join is looked at (access.py): let in, or kicked."""
        portal = self.context.portals.by_mxid(room_id)
        if portal is None or user_id == self.az.bot_mxid or self.context.is_bridge_ghost(user_id):
            return
        user = self.users.get(user_id)
        portal.submit(FromMatrix("join", user_id, event_id, user.level))

    async def handle_invite(
        self, room_id: RoomID, user_id: UserID, invited_by: BaseUser, evt: StateEvent
    ) -> None:
        """An invitation in a portal by someone other than the bot may be a grant
        (access.py), in the queue before the invitee's join."""
        portal = self.context.portals.by_mxid(room_id)
        inviter = invited_by.mxid
        if portal is None or inviter == self.az.bot_mxid or self.context.is_bridge_ghost(inviter):
            return
        level = self.users.get(inviter).level
        portal.submit(FromMatrix("invite", inviter, evt.event_id, level, target=user_id))

    def is_command(self, message: MessageEventContent) -> tuple[bool, str]:
        """The prefix is a whole word: ``!kalandrax help`` is a message, not a command."""
        text = message.body or ""
        prefix = str(self.config["bridge.command_prefix"])
        rest = text[len(prefix) :]
        if not text.startswith(prefix) or (rest and not rest[0].isspace()):
            return False, text
        return True, rest.lstrip()

    async def handle_leave(self, room_id: RoomID, user_id: UserID, event_id: EventID) -> None:
        self._removed(room_id, user_id, user_id, event_id, "")

    async def handle_reject(
        self, room_id: RoomID, user_id: UserID, reason: str, event_id: EventID
    ) -> None:
        """A declined invitation ends the grant like a leave (access.py)."""
        self._removed(room_id, user_id, user_id, event_id, reason)

    async def handle_disinvite(
        self,
        room_id: RoomID,
        user_id: UserID,
        disinvited_by: UserID,
        reason: str,
        event_id: EventID,
    ) -> None:
        self._removed(room_id, user_id, disinvited_by, event_id, reason)

    async def handle_kick(
        self, room_id: RoomID, user_id: UserID, kicked_by: UserID, reason: str, event_id: EventID
    ) -> None:
        self._moderated("kick", room_id, user_id, kicked_by, reason, event_id)

    async def handle_ban(
        self, room_id: RoomID, user_id: UserID, banned_by: UserID, reason: str, event_id: EventID
    ) -> None:
        self._moderated("ban", room_id, user_id, banned_by, reason, event_id)

    async def handle_unban(
        self, room_id: RoomID, user_id: UserID, unbanned_by: UserID, reason: str, event_id: EventID
    ) -> None:
        portal = self.context.portals.by_mxid(room_id)
        member = member_of(self.context, user_id)
        if portal is not None and member is not None:
            portal.submit(FromMatrix("unban", unbanned_by, event_id, member_id=member))

    def _moderated(
        self,
        action: str,
        room_id: RoomID,
        target: UserID,
        sender: UserID,
        reason: str,
        event_id: EventID,
    ) -> None:
        """A kick or ban by someone with the power to do it in the Matrix room (Synapse
        checked): of a ghost, the native member is kicked or banned in Kalandra; of a bridged
        user, the bridge removes its member."""
        portal = self.context.portals.by_mxid(room_id)
        member = member_of(self.context, target)
        if portal is None:
            return
        if member is not None:
            portal.submit(FromMatrix(action, sender, event_id, member_id=member, reason=reason))
        else:
            self._removed(room_id, target, sender, event_id, reason)

    def _removed(
        self, room_id: RoomID, target: UserID, sender: UserID, event_id: EventID, reason: str
    ) -> None:
        portal = self.context.portals.by_mxid(room_id)
        if portal is None or target == self.az.bot_mxid or self.context.is_bridge_ghost(target):
            return
        portal.submit(FromMatrix("leave", sender, event_id, target=target, reason=reason))

    async def handle_encrypted(self, evt: EncryptedEvent) -> None:
        """In portals, decryption fills the event's place in the queue (encryption/e2ee.py);
        elsewhere
        (the bot's management rooms), mautrix's handling."""
        portal = self.context.portals.by_mxid(evt.room_id)
        if portal is None:
            release_slot()
            if self.e2ee is None:
                await self._encryption_off(evt)
                return
            await super().handle_encrypted(evt)
            return
        await e2ee.decrypt_for_portal(self.context, portal, evt)

    async def _encryption_off(self, evt: EncryptedEvent) -> None:
        """An encrypted message to the bot while end-to-bridge encryption is off: a notice
        that says what the operator must change (mautrix's says only that it is off)."""
        try:
            await self.az.intent.send_notice(evt.room_id, ENCRYPTION_OFF)
        except Exception as exc:  # not in the room any more, or the homeserver refused
            self.log.debug("encryption notice not sent: %s", type(exc).__name__)
        await self._send_mss(
            cast(Event, evt),
            MessageStatus.FAIL,
            MessageStatusReason.UNDECRYPTABLE,
            "encryption is not enabled on this bridge",
        )

    async def handle_encryption(self, evt: StateEvent) -> None:
        content = cast(RoomEncryptionStateEventContent, evt.content)
        await self.az.state_store.set_encryption_info(evt.room_id, content)
        portal = self.context.portals.by_mxid(evt.room_id)
        if portal is not None:
            await e2ee.set_portal_encrypted(portal, True)

    async def handle_state_event(self, evt: StateEvent) -> None:
        """A name or topic change in a portal (portal/room_metadata.py); the bridge's own are not
        sent back."""
        portal = self.context.portals.by_mxid(evt.room_id)
        meta = room_metadata.meta_of_state(evt)
        if portal is None or meta is None:
            return
        if evt.sender == self.az.bot_mxid or self.context.is_bridge_ghost(evt.sender):
            return
        level = self.users.get(evt.sender).level
        portal.submit(FromMatrix("meta", evt.sender, evt.event_id, level, meta=meta))

    async def handle_event(self, evt: Event) -> None:
        if isinstance(evt, ReactionEvent) and evt.type == EventType.REACTION:
            self._reaction(evt)
            return
        if evt.type != EventType.ROOM_REDACTION or not isinstance(evt, RedactionEvent):
            return
        portal = self.context.portals.by_mxid(evt.room_id)
        if portal is None or evt.redacts is None:
            return
        reason = evt.content.reason or ""
        portal.submit(
            FromMatrix("redact", evt.sender, evt.event_id, redacts=evt.redacts, reason=reason)
        )

    def _reaction(self, evt: ReactionEvent) -> None:
        portal = self.context.portals.by_mxid(evt.room_id)
        relates = evt.content.relates_to
        if portal is None or not relates.event_id or not relates.key:
            return
        user = self.users.get(evt.sender)
        portal.submit(
            FromMatrix(
                "reaction",
                evt.sender,
                evt.event_id,
                user.level,
                relates_to=relates.event_id,
                key=relates.key,
            )
        )

    async def handle_ephemeral_event(
        self, evt: ReceiptEvent | PresenceEvent | TypingEvent
    ) -> None:
        """Read receipts and typing of bridged users in portals (portal/ephemeral.py)."""
        portal = (
            self.context.portals.by_mxid(evt.room_id)
            if not isinstance(evt, PresenceEvent)
            else None
        )
        if portal is None:
            return
        if isinstance(evt, TypingEvent):
            await self.ephemeral.typing(portal, evt.content.user_ids)
        elif isinstance(evt, ReceiptEvent):
            for event_id, receipts in evt.content.items():
                for kind, users in receipts.items():
                    if str(kind) != "m.read":
                        continue  # m.read.private stays private
                    for user_id in users:
                        await self.ephemeral.read(portal, user_id, event_id)

    async def accept_bot_invite(self, room_id: RoomID, inviter: BaseUser) -> None:
        try:
            await self.az.intent.join_room(room_id)
        except Exception:
            self.log.exception("Failed to join %s as the bridge bot", room_id)
            return
        if self.e2ee is not None:  # what happened before the bot joined (encryption, members)
            await e2ee.room_is_encrypted(self.context, room_id)
        if not inviter.is_whitelisted:
            # Join, say why, leave: the inviter sees the refusal in the room they made.
            await self.send_permission_error(room_id)
            await self.az.intent.leave_room(room_id)
            return
        await self.send_welcome_message(room_id, inviter)

    async def send_permission_error(self, room_id: RoomID) -> None:
        await self.az.intent.send_notice(room_id, REFUSAL)
