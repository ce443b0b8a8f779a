"""What the commands share: the bridge, the room a command is about, the member it names."""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from mautrix.bridge.commands import CommandEvent, HelpSection
from mautrix.types import EventID, UserID

from kalandra_core.client.driver import ClientError
from kalandra_core.client.room import ClientRoom

from .. import access
from ..db.roster import bridged_member

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace

# (mypy misreads HelpSection's NamedTuple constructor)
SECTION_ROOMS = HelpSection._make(("Kalandra rooms", 30, ""))
SECTION_MODERATION = HelpSection._make(("Moderation (bridge admins)", 40, ""))
SECTION_ACCOUNT = HelpSection._make(("Your Kalandra identity", 50, ""))

ROOM_ARG = "[_room id_]"
_FULL_ROOM = re.compile(r"(0x)?[0-9a-fA-F]{32}")


class CommandFailed(Exception):
    """A reply for the user instead of a result (bad argument, unknown room, ...)."""


def bridge_of(evt: CommandEvent) -> BridgeContext:
    return cast("BridgeContext", evt.bridge)


def portal_of(evt: CommandEvent) -> PortalFace | None:
    return bridge_of(evt).portals.by_mxid(evt.room_id)


def parse_room_id(text: str) -> bytes | None:
    try:
        room_id = bytes.fromhex(text.removeprefix("0x"))
    except (ValueError, binascii.Error):
        return None
    return room_id if len(room_id) == 16 else None


def active_room(evt: CommandEvent, room_id: bytes) -> ClientRoom:
    room = bridge_of(evt).bot.core.rooms.get(room_id)
    if room is None or not room.active:
        raise CommandFailed(f"The bridge is not a member of Kalandra room `{room_id.hex()}`.")
    return room


async def _by_prefix(evt: CommandEvent, prefix: str) -> bytes:
    """The one active room whose id starts with ``prefix`` among those the asker may see (so
    the answer is the same whether other rooms match or not)."""
    prefix = prefix.removeprefix("0x").lower()
    bridge = bridge_of(evt)
    candidates = [
        r
        for r, room in bridge.bot.core.rooms.items()
        if room.active and r.hex().startswith(prefix)
    ]
    matches = await access.rooms_of(bridge, evt.sender.mxid, candidates)
    if len(matches) != 1 or len(prefix) < 4:
        raise CommandFailed(
            f"`{prefix}` does not name one Kalandra room you are in"
            " (give the room id in hex, or a unique prefix of it)."
        )
    return matches[0]


async def check_access(evt: CommandEvent, room_id: bytes) -> None:
    """Refused unless the asker is in the room or a bridge admin (access.py); the refusal is
    the same whether the room exists or not."""
    if not await access.may_see(bridge_of(evt), room_id, evt.sender.mxid):
        raise CommandFailed(access.NOT_IN_ROOM.format(room=room_id.hex()))


async def take_room(evt: CommandEvent, args: list[str]) -> tuple[bytes, list[str]]:
    """The room a command is about, and the arguments after it; refused (check_access) when
    the asker is not in it.

    In a portal the room may be omitted (the portal's room); a first argument is taken as a
    room only when it is a full room id. Elsewhere the first argument is the room: its id in
    hex, or a unique prefix of it."""
    portal = portal_of(evt)
    if args and (_FULL_ROOM.fullmatch(args[0]) or portal is None):
        room_id = parse_room_id(args[0]) or await _by_prefix(evt, args[0])
        rest = args[1:]
    elif portal is None:
        raise CommandFailed("Which Kalandra room? Give its id (or run this in its portal).")
    else:
        room_id, rest = portal.room_id, args
    await check_access(evt, room_id)
    return room_id, rest


async def member_id_of(evt: CommandEvent, who: str) -> int:
    """A member id, a ghost (a native member) or a bridged Matrix user, as a member id."""
    if who.isdigit():
        return int(who)
    bridge = bridge_of(evt)
    matrix = bridge.matrix
    if who.startswith(matrix.user_id_prefix) and who.endswith(matrix.user_id_suffix):
        ghost = who[len(matrix.user_id_prefix) : len(who) - len(matrix.user_id_suffix)]
        if ghost.isdigit():
            return int(ghost)
    if who.startswith("@"):
        member = await bridged_member(bridge.db, UserID(who))
        if member is not None:
            return member
        raise CommandFailed(f"{who} is not a Kalandra member (not a ghost, not bridged).")
    raise CommandFailed(f"`{who}` is neither a member id nor a Matrix user id.")


Handler = Callable[[CommandEvent], Awaitable[EventID]]


def answers_failures(handler: Handler) -> Handler:
    """CommandFailed (and a refusal of the Kalandra server) becomes the reply."""

    @functools.wraps(handler)
    async def wrapper(evt: CommandEvent) -> EventID:
        try:
            return await handler(evt)
        except CommandFailed as exc:
            return await evt.reply(str(exc))
        except ClientError as exc:
            return await evt.reply(f"The Kalandra server refused: {exc} (error {exc.code}).")
        except TimeoutError:
            return await evt.reply("The Kalandra server did not answer in time; try again.")

    return wrapper
