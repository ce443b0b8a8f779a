"""The command processor: permission refusals before any command runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.bridge import BasePortal, BaseUser
from mautrix.bridge.commands import CommandEvent, CommandProcessor
from mautrix.types import EventID, MessageEventContent, RoomID

if TYPE_CHECKING:
    from ..context import BridgeContext

REFUSAL = (
    "You are not allowed to use this bridge. A bridge admin can give you the `user` permission"
    " in the `bridge.permissions` section of the bridge's config."
)


class KalandraCommandProcessor(CommandProcessor):
    def __init__(self, bridge: BridgeContext) -> None:
        super().__init__(bridge=bridge)

    async def handle(
        self,
        room_id: RoomID,
        event_id: EventID,
        sender: BaseUser,
        command: str,
        args: list[str],
        content: MessageEventContent,
        portal: BasePortal | None,
        is_management: bool,
        has_bridge_bot: bool,
    ) -> None:
        # mautrix would ignore such users silently; every command needs at least `user`.
        if not sender.is_whitelisted:
            evt = self.event_class(
                self,
                room_id,
                event_id,
                sender,
                command,
                args,
                content,
                portal,
                is_management,
                has_bridge_bot,
            )
            await evt.reply(REFUSAL)
            return
        await super().handle(
            room_id,
            event_id,
            sender,
            command,
            args,
            content,
            portal,
            is_management,
            has_bridge_bot,
        )


__all__ = ["REFUSAL", "CommandEvent", "KalandraCommandProcessor"]
