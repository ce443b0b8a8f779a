"""Relay mode of a portal: Matrix users with only the `relay` permission speak through the bot.

These commands only turn the portal's flag on and off (and remember who turned it on); what
relaying does to messages is the portal's. They exist when ``bridge.relay.enabled`` is true,
for bridge admins, or also for `user` when ``bridge.relay.admin_only`` is false.
"""

from __future__ import annotations

from typing import cast

from mautrix.bridge.commands import SECTION_ADMIN, CommandEvent, command_handler
from mautrix.types import EventID

from ..matrix_users import MatrixUser
from .util import CommandFailed, answers_failures, bridge_of, check_access, portal_of


async def _set(evt: CommandEvent, enabled: bool) -> EventID:
    config = bridge_of(evt).config
    if not config["bridge.relay.enabled"]:
        raise CommandFailed("Relay mode is not enabled on this bridge (`bridge.relay.enabled`).")
    sender = cast("MatrixUser", evt.sender)
    if config["bridge.relay.admin_only"] and not sender.is_admin:
        raise CommandFailed("This command is for bridge admins (`bridge.relay.admin_only`).")
    portal = portal_of(evt)
    if portal is None:
        raise CommandFailed("Run this command in a portal room.")
    await check_access(evt, portal.room_id)
    if portal.row.relay_enabled == enabled:
        state = "on" if enabled else "off"
        return await evt.reply(f"Relay mode is already {state} in this portal.")
    await portal.set_relay(enabled, sender.mxid if enabled else None)
    if enabled:
        return await evt.reply(
            "Relay mode is on: messages of Matrix users without their own Kalandra identity"
            " are relayed through the bridge bot."
        )
    return await evt.reply("Relay mode is off in this portal.")


@command_handler(
    name="set-relay",
    needs_auth=False,
    help_section=SECTION_ADMIN,
    help_text="Turn relay mode on in this portal: users with only the `relay` permission speak"
    " through the bridge bot (needs `bridge.relay.enabled`).",
)
@answers_failures
async def set_relay(evt: CommandEvent) -> EventID:
    return await _set(evt, True)


@command_handler(
    name="unset-relay",
    needs_auth=False,
    help_section=SECTION_ADMIN,
    help_text="Turn relay mode off in this portal.",
)
@answers_failures
async def unset_relay(evt: CommandEvent) -> EventID:
    return await _set(evt, False)
