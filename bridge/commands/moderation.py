"""Moderation by the bridge bot (bridge admins): kick, ban, unban a member; redact an entry.

The bot acts as itself: the Kalandra server checks that it is a moderator of the room (it is
the owner of rooms it created). A kicked or banned member is out for the server at once; the
server then proposes its Remove, which a member commits.
"""

from __future__ import annotations

from mautrix.bridge.commands import CommandEvent, command_handler
from mautrix.types import EventID

from .util import (
    SECTION_MODERATION,
    CommandFailed,
    active_room,
    answers_failures,
    bridge_of,
    member_id_of,
    take_room,
)

_MEMBER = "[_room id_] <_member id_ | _Matrix user_>"


async def _moderate(evt: CommandEvent, action: str, *, reason_allowed: bool) -> EventID:
    room_id, rest = await take_room(evt, evt.args)
    if not rest or (len(rest) > 1 and not reason_allowed):
        usage = f"{_MEMBER} [_reason_]" if reason_allowed else _MEMBER
        raise CommandFailed(f"**Usage:** `$cmdprefix+sp {action} {usage}`")
    active_room(evt, room_id)
    target = await member_id_of(evt, rest[0])
    bot = bridge_of(evt).bot
    if target == bot.member_id:
        raise CommandFailed("The bridge bot does not moderate itself.")
    assert bot.client is not None
    index = await bot.client.moderate(room_id, action, target, " ".join(rest[1:]))
    done = {"kick": "Kicked", "ban": "Banned", "unban": "Unbanned"}[action]
    return await evt.reply(f"{done} member {target} in `{room_id.hex()}` (log index {index}).")


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_MODERATION,
    help_args=f"{_MEMBER} [_reason_]",
    help_text="Kick a member out of a Kalandra room (it may be added again).",
)
@answers_failures
async def kick(evt: CommandEvent) -> EventID:
    return await _moderate(evt, "kick", reason_allowed=True)


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_MODERATION,
    help_args=f"{_MEMBER} [_reason_]",
    help_text="Ban a member from a Kalandra room (out, and not to be added again).",
)
@answers_failures
async def ban(evt: CommandEvent) -> EventID:
    return await _moderate(evt, "ban", reason_allowed=True)


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_MODERATION,
    help_args=_MEMBER,
    help_text="Lift a member's ban in a Kalandra room.",
)
@answers_failures
async def unban(evt: CommandEvent) -> EventID:
    return await _moderate(evt, "unban", reason_allowed=False)


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_MODERATION,
    help_args="[_room id_] <_log index_> [_reason_]",
    help_text="Redact a Kalandra log entry: the server deletes its payload for everyone.",
)
@answers_failures
async def redact(evt: CommandEvent) -> EventID:
    room_id, rest = await take_room(evt, evt.args)
    if not rest or not rest[0].isdigit():
        raise CommandFailed("**Usage:** `$cmdprefix+sp redact [room id] <log index> [reason]`")
    active_room(evt, room_id)
    client = bridge_of(evt).bot.client
    assert client is not None
    target = int(rest[0])
    index = await client.moderate(room_id, "redact", target, " ".join(rest[1:]))
    return await evt.reply(
        f"Redacted log index {target} of `{room_id.hex()}` (log index {index})."
    )
