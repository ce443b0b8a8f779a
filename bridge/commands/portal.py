"""Portal commands: create, open, list, and (admin, for now) invite a native member."""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING, cast

from mautrix.bridge.commands import SECTION_ADMIN, CommandEvent, HelpSection, command_handler
from mautrix.types import EventID

from ..portal import Portal

if TYPE_CHECKING:
    from ..bridge import KalandraBridge

SECTION_PORTALS = HelpSection._make(("Portals", 20, ""))  # (mypy misreads its NamedTuple)


def _bridge(evt: CommandEvent) -> KalandraBridge:
    return cast("KalandraBridge", evt.bridge)


def _room_id(text: str) -> bytes | None:
    try:
        room_id = bytes.fromhex(text.removeprefix("0x"))
    except (ValueError, binascii.Error):
        return None
    return room_id if len(room_id) == 16 else None


@command_handler(
    needs_auth=False,
    help_section=SECTION_PORTALS,
    help_args="<_name_>",
    help_text="Create a new Kalandra room and its Matrix portal, and invite you to it.",
)
async def create(evt: CommandEvent) -> EventID:
    name = " ".join(evt.args).strip()
    if not name:
        return await evt.reply("**Usage:** `$cmdprefix+sp create <name>`")
    bridge = _bridge(evt)
    bot = bridge.bot
    assert bot.client is not None
    room_id = await bot.client.create_room(name=name)
    await bot.state.flush()  # the room's MLS state is saved before the portal points at it
    portal = await Portal.get_or_create(
        bridge, room_id, name=name, topic="", last_log_index=bot.core.rooms[room_id].last_seen
    )
    await portal.ensure_matrix_room(invite=[evt.sender.mxid])
    return await evt.reply(f"Created Kalandra room `{portal.hex}`: {portal.alias}")


@command_handler(
    needs_auth=False,
    help_section=SECTION_PORTALS,
    help_args="<_room id_>",
    help_text="Open the Matrix portal of a Kalandra room the bridge is in, and invite you.",
)
async def open(evt: CommandEvent) -> EventID:
    room_id = _room_id(evt.args[0]) if evt.args else None
    if room_id is None:
        return await evt.reply("**Usage:** `$cmdprefix+sp open <room id in hex>`")
    bridge = _bridge(evt)
    room = bridge.bot.core.rooms.get(room_id)
    if room is None or not room.active:
        return await evt.reply(f"The bridge is not a member of Kalandra room `{room_id.hex()}`.")
    assert bridge.kalandra is not None
    state = await bridge.kalandra.store.load_room(room_id)
    name, topic = ("", "") if state is None else (state.room.name, state.room.topic)
    portal = await Portal.get_or_create(
        bridge, room_id, name=name, topic=topic, last_log_index=room.last_seen
    )
    await portal.ensure_matrix_room(invite=[evt.sender.mxid])
    return await evt.reply(f"Portal of `{portal.hex}`: {portal.alias}")


@command_handler(
    name="list",
    needs_auth=False,
    help_section=SECTION_PORTALS,
    help_text="List the bridged Kalandra rooms.",
)
async def list_portals(evt: CommandEvent) -> EventID:
    portals = await Portal.load_all(_bridge(evt))
    if not portals:
        return await evt.reply("No portals yet. Make one with `$cmdprefix+sp create <name>`.")
    lines = [
        f"* `{p.hex}` {p.row.name or '(no name)'}: {p.alias}"
        + ("" if p.mxid else " (Matrix room not created yet)")
        for p in portals
    ]
    return await evt.reply("\n".join(lines))


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_ADMIN,
    help_args="<_room id_> <_member id_>",
    help_text="Add a native Kalandra member to a room (from its published KeyPackage).",
)
async def invite(evt: CommandEvent) -> EventID:
    room_id = _room_id(evt.args[0]) if len(evt.args) == 2 else None
    if room_id is None or not evt.args[1].isdigit():
        return await evt.reply("**Usage:** `$cmdprefix+sp invite <room id in hex> <member id>`")
    member_id = int(evt.args[1])
    bot = _bridge(evt).bot
    assert bot.client is not None
    if room_id not in bot.core.rooms:
        return await evt.reply(f"The bridge is not a member of Kalandra room `{room_id.hex()}`.")
    try:
        async with bot.commit_lock:
            index = await bot.client.invite(room_id, [member_id])
    except Exception as exc:
        return await evt.reply(f"Could not add member {member_id}: {exc}")
    await bot.state.flush()
    return await evt.reply(f"Added member {member_id} to `{room_id.hex()}` (log index {index}).")
