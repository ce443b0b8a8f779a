"""Matrix events in: the bot's invites and commands, and portal messages of bridged users."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.bridge import BaseMatrixHandler, BaseUser
from mautrix.types import EventID, MessageEvent, RoomID, UserID

from .commands import REFUSAL, KalandraCommandProcessor
from .portal import Portal
from .user import User

if TYPE_CHECKING:
    from .bridge import KalandraBridge


class MatrixHandler(BaseMatrixHandler):
    def __init__(self, bridge: KalandraBridge) -> None:
        prefix, _, suffix = bridge.config["bridge.username_template"].partition("{userid}")
        self.user_id_prefix = f"@{prefix}"
        self.user_id_suffix = f"{suffix}:{bridge.config['homeserver.domain']}"
        super().__init__(command_processor=KalandraCommandProcessor(bridge), bridge=bridge)

    # mautrix drops messages and commands of users without permission silently; we let them
    # through to the command processor, which answers with a refusal. Portal messages will be
    # checked per sender by the portal (allow_bridging_message).
    async def allow_message(self, user: BaseUser) -> bool:
        return True

    @staticmethod
    async def allow_command(user: BaseUser) -> bool:
        return True

    async def handle_message(self, evt: MessageEvent, was_encrypted: bool = False) -> None:
        """Portal messages of bridged users go to the portal's queue toward Kalandra; the
        rest (commands, management rooms) is mautrix's."""
        portal = Portal.by_mxid(evt.room_id)
        sender = evt.sender
        if portal is None or self.is_command(evt.content)[0]:
            await super().handle_message(evt, was_encrypted)
            return
        if sender == self.az.bot_mxid or self.bridge.is_bridge_ghost(sender):
            return  # our own ghosts and bot: never bridged back (no echo loop)
        user = User.get_by_mxid(sender)
        if not user.is_whitelisted:
            return  # relay users are relayed through the bot by a later slice
        portal.from_matrix(sender, user.level, evt.content, evt.event_id)

    async def handle_join(self, room_id: RoomID, user_id: UserID, event_id: EventID) -> None:
        portal = Portal.by_mxid(room_id)
        if portal is None or user_id == self.az.bot_mxid or self.bridge.is_bridge_ghost(user_id):
            return
        user = User.get_by_mxid(user_id)
        if user.is_whitelisted:
            portal.member_joined(user_id, user.level, event_id)

    async def accept_bot_invite(self, room_id: RoomID, inviter: BaseUser) -> None:
        try:
            await self.az.intent.join_room(room_id)
        except Exception:
            self.log.exception("Failed to join %s as the bridge bot", room_id)
            return
        if not inviter.is_whitelisted:
            # Join, say why, leave: the inviter sees the refusal in the room they made.
            await self.send_permission_error(room_id)
            await self.az.intent.leave_room(room_id)
            return
        await self.send_welcome_message(room_id, inviter)

    async def send_permission_error(self, room_id: RoomID) -> None:
        await self.az.intent.send_notice(room_id, REFUSAL)
