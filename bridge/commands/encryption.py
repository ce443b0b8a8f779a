"""End-to-bridge encryption commands (mautrix's names)."""

from __future__ import annotations

from mautrix.bridge.commands import SECTION_ADMIN, CommandEvent, command_handler
from mautrix.types import EventID

from ..encryption import e2ee
from .util import answers_failures, bridge_of


@command_handler(
    name="discard-megolm-session",
    aliases=["discard-session"],
    needs_admin=True,
    needs_auth=False,
    help_section=SECTION_ADMIN,
    help_text="Discard the bridge's outbound Megolm session in this room: the next message the"
    " bridge sends here starts a new one.",
)
@answers_failures
async def discard_megolm_session(evt: CommandEvent) -> EventID:
    if not await e2ee.discard_outbound_session(bridge_of(evt), evt.room_id):
        return await evt.reply("End-to-bridge encryption is not enabled on this bridge.")
    return await evt.reply("Discarded the outbound Megolm session of this room.")
