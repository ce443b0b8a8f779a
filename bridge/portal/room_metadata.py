"""Room name, topic and avatar, both ways.

In Kalandra a change is an end-to-end encrypted message that every member applies in log
order (``kalandra_core.client.room_meta``); the server's plaintext copy (from room creation)
is only the starting point and is never updated.

Kalandra -> Matrix: a change by a native member becomes ``m.room.name`` / ``m.room.topic`` in
the portal, sent by that member's ghost when the room's power levels let the ghost send it,
else by the bot (which created the portal and holds power 100), so the change always shows
and, where the room allows it, under the changer's name. A value Matrix already has is not
sent again (a change that came from Matrix, or an entry replayed after a restart); changes
made by the bot's leaf or a bridged user's leaf came from Matrix and are only recorded.
An avatar is read from the room's blocks by the bot's client and uploaded to Synapse by
whoever sends the state event; the event names the Kalandra image (``AVATAR_KEY``: the hash of
its encrypted manifest, which the server already knows) so the same image is not sent again.

Matrix -> Kalandra: a name or topic event in a portal, which Synapse accepted only from
someone with the power to send it, goes through the portal's queue toward Kalandra: from the
sender's own leaf when they have the ``user`` permission, else from the bot's leaf (the room's
power levels already decided who may rename it). An avatar is downloaded from Synapse by the
bot and stored as the room's blocks through the bot's client before the change is sent.
Events of the bot and of ghosts are never sent back (they are what the bridge did).
"""

from __future__ import annotations

import logging
import tempfile
from typing import TYPE_CHECKING, Any, Final

from mautrix.api import Method, Path
from mautrix.errors import MNotFound
from mautrix.types import JSON, ContentURI, EventType, MessageStatusReason, StateEvent

from kalandra_core.client import events as ev
from kalandra_core.client.driver import ClientError
from kalandra_core.client.profile import with_profile
from kalandra_core.client.room_meta import (
    MAX_AVATAR,
    InvalidRoomMeta,
    RoomMeta,
    check_avatar,
    meta_content,
)
from kalandra_core.media.blob import MediaError, MediaRef

from ..members.bot_send import bot_send
from ..portal_work import MatrixAvatar
from . import media
from .statuses import Refused

if TYPE_CHECKING:
    from mautrix.appservice import IntentAPI

    from ..context import BridgeContext, PortalFace
    from ..portal_work import FromMatrix

log = logging.getLogger("kalandra.bridge.metadata")

_TYPES = {
    "name": EventType.ROOM_NAME,
    "topic": EventType.ROOM_TOPIC,
    "avatar": EventType.ROOM_AVATAR,
}
AVATAR_KEY: Final = "net.kalandra.avatar"  # in m.room.avatar: the image's manifest hash (hex)
# Image types told by their first bytes, for an m.room.avatar without info.mimetype.
_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


def current(bridge: BridgeContext, room_id: bytes, name: str, topic: str) -> tuple[str, str]:
    """The room's name and topic for a new portal: the members' latest change where the bot
    saw one, else ``name``/``topic`` (the server's copy from creation)."""
    client = bridge.bot.client
    room = None if client is None else client.core.rooms.get(room_id)
    if room is None:
        return name, topic
    return room.name or name, room.topic or topic


# --- Kalandra -> Matrix ---------------------------------------------------------------------


async def meta_to_matrix(portal: PortalFace, item: ev.RoomMetaChanged) -> None:
    bridge = portal.bridge
    await bridge.db.execute(
        "UPDATE bridge_portals SET name = $2, topic = $3 WHERE room_id = $1",
        portal.room_id,
        item.name,
        item.topic,
    )
    portal.row.name, portal.row.topic = item.name, item.topic
    if portal.is_native(item.sender_id):
        for field in item.changed:
            if field == "avatar":
                await _set_avatar(portal, item.sender_id, item.avatar)
                continue
            value = item.name if field == "name" else item.topic
            await _set_state(portal, item.sender_id, field, value)
    await portal.advance(item.log_index, None)


async def _state_now(portal: PortalFace, event_type: EventType) -> dict[str, Any]:
    try:
        now: dict[str, Any] = await portal.bridge.az.intent.api.request(
            Method.GET, Path.v3.rooms[portal.room_mxid].state[str(event_type)]
        )
    except MNotFound:
        now = {}
    return now


async def _sender(portal: PortalFace, sender_id: int, event_type: EventType) -> IntentAPI:
    """The member's ghost when the room lets it send ``event_type``, else the bot."""
    bot = portal.bridge.az.intent
    ghost = await portal.ghost(sender_id)
    levels = await bot.get_power_levels(portal.room_mxid, ignore_cache=True)  # (changes are rare)
    may = levels.get_user_level(ghost.mxid) >= levels.get_event_level(event_type)
    return ghost.intent if may else bot


async def _set_state(portal: PortalFace, sender_id: int, field: str, value: str) -> None:
    event_type = _TYPES[field]
    if ((await _state_now(portal, event_type)).get(field) or "") == value:
        return  # Matrix has it already
    intent = await _sender(portal, sender_id, event_type)
    await intent.send_state_event(portal.room_mxid, event_type, JSON({field: value}))
    log.info("portal %s: %s changed from Kalandra", portal.hex, field)


async def _set_avatar(portal: PortalFace, sender_id: int, ref: MediaRef | None) -> None:
    now = await _state_now(portal, EventType.ROOM_AVATAR)
    if ref is None and not now.get("url"):
        return  # Matrix has no avatar either
    if ref is not None and now.get(AVATAR_KEY) == ref.manifest.hex():
        return  # this image is there already (a change replayed after a restart)
    intent = await _sender(portal, sender_id, EventType.ROOM_AVATAR)
    content: dict[str, Any] = {}
    if ref is not None:
        client = portal.bridge.bot.client
        assert client is not None
        try:
            image = await client.download_media(portal.room_id, ref)
        except (MediaError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.code == 0:
                raise  # (disconnected: the portal's queue tries again)
            log.warning("portal %s: the room avatar could not be read (%s)", portal.hex, exc)
            return
        mxc = await intent.upload_media(image, mime_type=ref.mimetype, filename=ref.name or None)
        content = _avatar_content(mxc, ref)
    await intent.send_state_event(portal.room_mxid, EventType.ROOM_AVATAR, JSON(content))
    log.info("portal %s: avatar changed from Kalandra", portal.hex)


def _avatar_content(mxc: ContentURI, ref: MediaRef) -> dict[str, Any]:
    info: dict[str, Any] = {"mimetype": ref.mimetype, "size": ref.size}
    if ref.width is not None and ref.height is not None:
        info |= {"w": ref.width, "h": ref.height}
    return {"url": mxc, "info": info, AVATAR_KEY: ref.manifest.hex()}


async def initial_avatar(portal: PortalFace) -> dict[str, Any] | None:
    """The m.room.avatar content a new portal starts with: the room's avatar as the bot's
    client has applied it (the members' latest change, like the name in :func:`current`), the
    image uploaded by the bot. None: no avatar, or it cannot be read now (the portal is made
    without it rather than not at all)."""
    bridge = portal.bridge
    client = bridge.bot.client
    room = None if client is None else client.core.rooms.get(portal.room_id)
    ref = None if room is None else room.avatar
    if client is None or ref is None:
        return None
    try:
        image = await client.download_media(portal.room_id, ref)
        mxc = await bridge.az.intent.upload_media(
            image, mime_type=ref.mimetype, filename=ref.name or None
        )
    except Exception as exc:
        log.warning("portal %s: new portal without its avatar (%s)", portal.hex, exc)
        return None
    return _avatar_content(mxc, ref)


# --- Matrix -> Kalandra ---------------------------------------------------------------------


def meta_of_state(evt: StateEvent) -> RoomMeta | MatrixAvatar | None:
    """The change an m.room.name / topic / avatar event makes (None: another event)."""
    content = evt.content.serialize() if hasattr(evt.content, "serialize") else {}
    if evt.type == EventType.ROOM_AVATAR:
        url, info = content.get("url"), content.get("info")
        if not isinstance(url, str) or not url:
            return RoomMeta(remove_avatar=True)
        mimetype = info.get("mimetype") if isinstance(info, dict) else None
        return MatrixAvatar(ContentURI(url), mimetype if isinstance(mimetype, str) else None)
    if evt.type == EventType.ROOM_NAME:
        name = content.get("name")
        return RoomMeta(name=name if isinstance(name, str) else "")
    if evt.type == EventType.ROOM_TOPIC:
        topic = content.get("topic")
        return RoomMeta(topic=topic if isinstance(topic, str) else "")
    return None


async def meta_to_kalandra(portal: PortalFace, work: FromMatrix) -> None:
    assert work.meta is not None
    meta = work.meta
    try:
        if isinstance(meta, MatrixAvatar):
            meta = RoomMeta(avatar=await _avatar_to_kalandra(portal, meta))
        content = meta_content(meta)
    except InvalidRoomMeta as exc:
        raise Refused(MessageStatusReason.UNSUPPORTED, f"{exc}.") from None
    bridge = portal.bridge
    if work.permission in ("user", "admin"):
        user = await bridge.bridged_users.get(work.sender, work.permission)
        content = with_profile(content, await portal.profile(work.sender))
        index = await user.send(portal.room_id, content, work.event_id)
    else:
        index = await bot_send(bridge, portal.room_id, content, work.event_id)
    log.info("portal %s: room metadata from Matrix at log index %d", portal.hex, index)


async def _avatar_to_kalandra(portal: PortalFace, avatar: MatrixAvatar) -> MediaRef:
    """The Matrix avatar's image stored as the room's blocks (through the bot's client)."""
    bridge = portal.bridge
    client = bridge.bot.client
    assert client is not None
    limit = min(MAX_AVATAR, media.max_size(bridge))
    with tempfile.TemporaryFile() as spool:
        size = await media.download_into(bridge.az.intent, avatar.url, spool, limit, None)
        spool.seek(0)
        head = spool.read(16)
        mimetype = avatar.mimetype or next((m for b, m in _MAGIC if head.startswith(b)), "")
        check_avatar(MediaRef(bytes(32), bytes(32), size, mimetype, "", "image"))
        spool.seek(0)
        return await client.upload_media(
            portal.room_id, spool, mimetype=mimetype, name="avatar", kind="image"
        )
