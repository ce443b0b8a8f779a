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

from ..db.roster import bridged_member
from ..portal import Portal

if TYPE_CHECKING:
    from ..bridge import KalandraBridge

# (mypy misreads HelpSection's NamedTuple constructor)
SECTION_ROOMS = HelpSection._make(("Kalandra rooms", 30, ""))
SECTION_MODERATION = HelpSection._make(("Moderation (bridge admins)", 40, ""))
SECTION_ACCOUNT = HelpSection._make(("Your Kalandra identity", 50, ""))

ADMIN_ONLY = "This command is for bridge admins."
ROOM_ARG = "[_room id_]"
_FULL_ROOM = re.compile(r"(0x)?[0-9a-fA-F]{32}")


class CommandFailed(Exception):
    """A reply for the user instead of a result (bad argument, unknown room, ...)."""


def bridge_of(evt: CommandEvent) -> KalandraBridge:
    return cast("KalandraBridge", evt.bridge)


def portal_of(evt: CommandEvent) -> Portal | None:
    return Portal.by_mxid(evt.room_id)


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


def _by_prefix(evt: CommandEvent, prefix: str) -> bytes:
    prefix = prefix.removeprefix("0x").lower()
    rooms = bridge_of(evt).bot.core.rooms
    matches = [r for r, room in rooms.items() if room.active and r.hex().startswith(prefix)]
    if len(matches) != 1 or len(prefix) < 4:
        raise CommandFailed(
            f"`{prefix}` does not name one Kalandra room the bridge is in"
            " (give the room id in hex, or a unique prefix of it)."
        )
    return matches[0]


def take_room(evt: CommandEvent, args: list[str]) -> tuple[bytes, list[str]]:
    """The room a command is about, and the arguments after it.

    In a portal the room may be omitted (the portal's room); a first argument is taken as a
    room only when it is a full room id. Elsewhere the first argument is the room: its id in
    hex, or a unique prefix of it."""
    portal = portal_of(evt)
    if args and (_FULL_ROOM.fullmatch(args[0]) or portal is None):
        room_id = parse_room_id(args[0]) or _by_prefix(evt, args[0])
        return room_id, args[1:]
    if portal is None:
        raise CommandFailed("Which Kalandra room? Give its id (or run this in its portal).")
    return portal.room_id, args


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
