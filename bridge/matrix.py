"""Matrix events in: the bot's invites and commands (portals arrive later)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.bridge import BaseMatrixHandler, BaseUser
from mautrix.types import RoomID

from .commands import REFUSAL, KalandraCommandProcessor

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
