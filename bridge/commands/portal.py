"""Portal commands: create, open, list, and (admins) invite a native member or a Matrix user.

Who may open and list which room is the access policy's (access.py)."""

from __future__ import annotations

from mautrix.bridge.commands import SECTION_ADMIN, CommandEvent, HelpSection, command_handler
from mautrix.types import EventID, UserID

from kalandra_core.client.bridge_invite import is_matrix_user

from .. import access
from .util import (
    CommandFailed,
    active_room,
    answers_failures,
    bridge_of,
    check_access,
    parse_room_id,
)

SECTION_PORTALS = HelpSection._make(("Portals", 20, ""))  # (mypy misreads its NamedTuple)


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
    bridge = bridge_of(evt)
    bot = bridge.bot
    assert bot.client is not None
    room_id = await bot.client.create_room(name=name)
    await bot.state.flush()  # the room's MLS state is saved before the portal points at it
    portal = await bridge.portals.get_or_create(
        room_id, name=name, topic="", last_log_index=bot.core.rooms[room_id].last_seen
    )
    await access.grant(bridge, room_id, evt.sender.mxid, f"creator:{evt.sender.mxid}")
    await portal.ensure_matrix_room(invite=[evt.sender.mxid])
    return await evt.reply(f"Created Kalandra room `{portal.hex}`: {portal.alias}")


@command_handler(
    needs_auth=False,
    help_section=SECTION_PORTALS,
    help_args="<_room id_>",
    help_text="Open the Matrix portal of a Kalandra room you are in (or were invited to), and"
    " invite you. Bridge admins: any room the bridge is in.",
)
@answers_failures
async def open(evt: CommandEvent) -> EventID:
    room_id = parse_room_id(evt.args[0]) if evt.args else None
    if room_id is None:
        raise CommandFailed("**Usage:** `$cmdprefix+sp open <room id in hex>`")
    bridge = bridge_of(evt)
    sender = evt.sender.mxid
    if access.level_of(bridge, sender) not in ("user", "admin"):
        raise CommandFailed("Opening portals needs the `user` permission.")
    await check_access(evt, room_id)
    active_room(evt, room_id)
    portal = await bridge.portals.open(room_id)
    # A member of the room (or an admin) reads the history the bridge kept; someone only
    # invited reads from the invitation on.
    member = access.is_admin(bridge, sender) or await access.member_in_room(
        bridge, room_id, sender
    )
    await portal.let_in(sender, with_history=member)
    return await evt.reply(f"Portal of `{portal.hex}`: {portal.alias}")


@command_handler(
    name="list",
    needs_auth=False,
    help_section=SECTION_PORTALS,
    help_text="List the bridged Kalandra rooms you are in (bridge admins: all of them).",
)
async def list_portals(evt: CommandEvent) -> EventID:
    bridge = bridge_of(evt)
    portals = await bridge.portals.load_all()
    sender = evt.sender.mxid
    admin = access.is_admin(bridge, sender)
    if not admin:
        mine = set(await access.rooms_of(bridge, sender, [p.room_id for p in portals]))
        portals = [p for p in portals if p.room_id in mine]
    if not portals:
        return await evt.reply(
            "You are in no bridged Kalandra room yet. Make one with"
            " `$cmdprefix+sp create <name>`, or ask a member of a room to invite you."
        )
    lines = [
        f"* `{p.hex}` {p.row.name or '(no name)'}: {p.alias}"
        + ("" if p.mxid else " (Matrix room not created yet)")
        for p in portals
    ]
    if admin:
        lines.insert(0, "All portals (you are a bridge admin, so you see every one):")
    return await evt.reply("\n".join(lines))


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_ADMIN,
    help_args="<_room id_> <_member id_ | _Matrix user_>",
    help_text="Add a native Kalandra member to a room (from its published KeyPackage), or let"
    " a Matrix user into the room's portal (invited; their bridged member joins the room when"
    " they join).",
)
@answers_failures
async def invite(evt: CommandEvent) -> EventID:
    room_id = parse_room_id(evt.args[0]) if len(evt.args) == 2 else None
    who = evt.args[1] if len(evt.args) == 2 else ""
    if room_id is None or not (who.isdigit() or is_matrix_user(who)):
        raise CommandFailed(
            "**Usage:** `$cmdprefix+sp invite <room id in hex> <member id | @user:domain>`"
        )
    bridge = bridge_of(evt)
    if who.startswith("@"):
        active_room(evt, room_id)
        user = UserID(who)
        if access.level_of(bridge, user) == "none":
            raise CommandFailed(f"{user} has no permission to use this bridge.")
        await access.grant(bridge, room_id, user, f"admin:{evt.sender.mxid}")
        portal = await bridge.portals.open(room_id)
        await portal.let_in(user, with_history=False)
        return await evt.reply(f"Invited {user} into the portal of `{room_id.hex()}`.")
    member_id = int(who)
    bot = bridge.bot
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
