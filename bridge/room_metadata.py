"""Room name and topic, both ways.

In Kalandra a change is an end-to-end encrypted message that every member applies in log
order (``kalandra_core.client.room_meta``); the server's plaintext copy (from room creation)
is only the starting point and is never updated.

Kalandra -> Matrix: a change by a native member becomes ``m.room.name`` / ``m.room.topic`` in
the portal, sent by that member's ghost when the room's power levels let the ghost send it,
else by the bot (which created the portal and holds power 100), so the change always shows
and, where the room allows it, under the changer's name. A value Matrix already has is not
sent again (a change that came from Matrix, or an entry replayed after a restart); changes
made by the bot's leaf or a bridged user's leaf came from Matrix and are only recorded.

Matrix -> Kalandra: a name or topic event in a portal, which Synapse accepted only from
someone with the power to send it, goes through the portal's queue toward Kalandra: from the
sender's own leaf when they have the ``user`` permission, else from the bot's leaf (the room's
power levels already decided who may rename it). Events of the bot and of ghosts are never
sent back (they are what the bridge did).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.errors import MNotFound
from mautrix.types import JSON, EventType, MessageStatusReason, StateEvent

from kalandra_core.client import events as ev
from kalandra_core.client.room_meta import InvalidRoomMeta, RoomMeta, meta_content

from .bridged_user import BridgedUser
from .message_status import Refused
from .send_chains import mark_bot_send

if TYPE_CHECKING:
    from mautrix.appservice import IntentAPI

    from .bridge import KalandraBridge
    from .portal_to_kalandra import FromMatrix, PortalToKalandra
    from .portal_to_matrix import PortalToMatrix

log = logging.getLogger("kalandra.bridge.metadata")

_TYPES = {"name": EventType.ROOM_NAME, "topic": EventType.ROOM_TOPIC}


def current(bridge: KalandraBridge, room_id: bytes, name: str, topic: str) -> tuple[str, str]:
    """The room's name and topic for a new portal: the members' latest change where the bot
    saw one, else ``name``/``topic`` (the server's copy from creation)."""
    client = bridge.bot.client
    room = None if client is None else client.core.rooms.get(room_id)
    if room is None:
        return name, topic
    return room.name or name, room.topic or topic


# --- Kalandra -> Matrix ---------------------------------------------------------------------


async def meta_to_matrix(portal: PortalToMatrix, item: ev.RoomMetaChanged) -> None:
    bridge = portal.bridge
    await bridge.db.execute(
        "UPDATE bridge_portals SET name = $2, topic = $3 WHERE room_id = $1",
        portal.room_id,
        item.name,
        item.topic,
    )
    portal.row.name, portal.row.topic = item.name, item.topic
    if portal._native(item.sender_id):
        for field in item.changed:
            value = item.name if field == "name" else item.topic
            await _set_state(portal, item.sender_id, field, value)
    await portal._advance(item.log_index, None)


async def _set_state(portal: PortalToMatrix, sender_id: int, field: str, value: str) -> None:
    room = portal._room()
    event_type = _TYPES[field]
    bot = portal.bridge.az.intent
    try:
        now: dict[str, Any] = await bot.api.request(
            Method.GET, Path.v3.rooms[room].state[str(event_type)]
        )
    except MNotFound:
        now = {}
    if (now.get(field) or "") == value:
        return  # Matrix has it already
    ghost = await portal._ghost(sender_id)
    levels = await bot.get_power_levels(room, ignore_cache=True)  # (changes are rare)
    may = levels.get_user_level(ghost.mxid) >= levels.get_event_level(event_type)
    intent: IntentAPI = ghost.intent if may else bot
    await intent.send_state_event(room, event_type, JSON({field: value}))
    log.info("portal %s: %s changed from Kalandra", portal.hex, field)


# --- Matrix -> Kalandra ---------------------------------------------------------------------


def meta_of_state(evt: StateEvent) -> RoomMeta | None:
    """The change an m.room.name / m.room.topic event makes (None: another event)."""
    content = evt.content.serialize() if hasattr(evt.content, "serialize") else {}
    if evt.type == EventType.ROOM_NAME:
        name = content.get("name")
        return RoomMeta(name=name if isinstance(name, str) else "")
    if evt.type == EventType.ROOM_TOPIC:
        topic = content.get("topic")
        return RoomMeta(topic=topic if isinstance(topic, str) else "")
    return None


async def meta_to_kalandra(portal: PortalToKalandra, work: FromMatrix) -> None:
    assert work.meta is not None
    try:
        content = meta_content(work.meta)
    except InvalidRoomMeta as exc:
        raise Refused(MessageStatusReason.UNSUPPORTED, f"{exc}.") from None
    bridge = portal.bridge
    if work.permission in ("user", "admin"):
        user = await BridgedUser.get(bridge, work.sender, work.permission)
        index = await user.send(portal.room_id, content, work.event_id)
    else:
        client = bridge.bot.client
        assert client is not None
        await mark_bot_send(bridge, portal.room_id)
        index = await client.send(portal.room_id, content)
    log.info("portal %s: room metadata from Matrix at log index %d", portal.hex, index)
