"""Bridge an existing Matrix room to a Kalandra room, and unbridge a portal (bridge admins)."""

from __future__ import annotations

from mautrix.bridge.commands import SECTION_ADMIN, CommandEvent, command_handler
from mautrix.errors import MatrixRequestError
from mautrix.types import EventID

from .util import CommandFailed, active_room, answers_failures, bridge_of, parse_room_id, portal_of


@command_handler(
    name="bridge",
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_ADMIN,
    help_args="<_room id_>",
    help_text="Make this Matrix room the portal of a Kalandra room the bridge is in (neither"
    " may be bridged already). The bot needs the power to send state events here.",
)
@answers_failures
async def bridge_room(evt: CommandEvent) -> EventID:
    room_id = parse_room_id(evt.args[0]) if len(evt.args) == 1 else None
    if room_id is None:
        raise CommandFailed("**Usage:** `$cmdprefix+sp bridge <room id in hex>`")
    if portal_of(evt) is not None:
        raise CommandFailed("This Matrix room is a portal already (`unbridge` it first).")
    room = active_room(evt, room_id)
    bridge = bridge_of(evt)
    existing = bridge.portals.get(room_id)
    if existing is not None and existing.mxid is not None:
        raise CommandFailed(
            f"Kalandra room `{room_id.hex()}` is bridged already, to {existing.mxid}."
        )
    if existing is not None:  # a portal whose Matrix room was never made: replaced
        bridge.portals.forget(existing)
        await existing.stop()
    assert bridge.kalandra is not None
    state = await bridge.kalandra.store.load_room(room_id)
    name, topic = ("", "") if state is None else (state.room.name, state.room.topic)
    try:
        await bridge.portals.bridge_existing(
            room_id,
            evt.room_id,
            name=name,
            topic=topic,
            last_log_index=room.last_seen,
        )
    except MatrixRequestError as exc:
        raise CommandFailed(
            f"Could not mark this room as bridged ({exc.errcode}): the bot needs the power"
            " level to send state events here."
        ) from None
    return await evt.reply(
        f"This room is now the portal of Kalandra room `{room_id.hex()}` ({name or 'no name'})."
    )


@command_handler(
    needs_auth=False,
    needs_admin=True,
    help_section=SECTION_ADMIN,
    help_text="Disconnect this portal: nothing more is bridged, the bridge state and the bot"
    " leave this Matrix room, and the Kalandra room (with the bot in it) can be bridged again.",
)
@answers_failures
async def unbridge(evt: CommandEvent) -> EventID:
    portal = portal_of(evt)
    if portal is None:
        raise CommandFailed("This Matrix room is not a portal.")
    # Said before the bot leaves the room (it could not answer after).
    reply = await evt.reply(
        f"Unbridging Kalandra room `{portal.hex}`: the bot leaves this room. The Kalandra"
        " room stays; bridge it again with `bridge` or `open`."
    )
    await portal.unbridge()
    return reply
