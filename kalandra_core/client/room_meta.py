"""Room metadata (name, topic, avatar) as end-to-end encrypted messages.

A change is an ordinary AppMessage whose content is a notice with a ``room_meta`` map
(``{"name": str}``, ``{"topic": str}``, ``{"avatar": media map}`` or any of them together):
every member applies it in log order, so all agree on the current name, topic and avatar, and
the server never sees them. The avatar is an image stored as the room's encrypted blocks like
any shared file (a :class:`~kalandra_core.media.MediaRef`); ``"avatar": null`` removes it. The
notice's body is a readable line ("changed the room name to ..."), which is what a client that
does not know the field shows. The name and topic given at room creation (GroupInfoData) are
the server's plaintext copy and the starting point; changes never update that copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..media.blob import MediaError, MediaRef
from . import events as ev
from .content import Content

if TYPE_CHECKING:
    from .room import ClientRoom

FIELD = "room_meta"
MAX_NAME = 255  # characters, as Matrix clients expect of m.room.name
MAX_TOPIC = 4096
MAX_AVATAR = 10 * 1024 * 1024  # bytes: an avatar is a small picture, not a photo album


class InvalidRoomMeta(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RoomMeta:
    """A change: None leaves that field as it is; ``remove_avatar`` drops the avatar."""

    name: str | None = None
    topic: str | None = None
    avatar: MediaRef | None = None
    remove_avatar: bool = False


def check_avatar(ref: MediaRef) -> None:
    """Refuse what cannot be a room avatar (not an image, or too large)."""
    if ref.kind != "image" or not ref.mimetype.startswith("image/"):
        raise InvalidRoomMeta("a room avatar is an image")
    if ref.size > MAX_AVATAR:
        raise InvalidRoomMeta(f"a room avatar has {MAX_AVATAR // (1024 * 1024)} MiB at most")


def meta_content(meta: RoomMeta) -> Content:
    """The message that makes this change (refused when empty, too long or not an image)."""
    fields: dict[str, Any] = {}
    lines: list[str] = []
    if meta.name is not None:
        if len(meta.name) > MAX_NAME:
            raise InvalidRoomMeta(f"a room name has {MAX_NAME} characters at most")
        fields["name"] = meta.name
        lines.append(f"renamed the room to {meta.name!r}" if meta.name else "removed the name")
    if meta.topic is not None:
        if len(meta.topic) > MAX_TOPIC:
            raise InvalidRoomMeta(f"a room topic has {MAX_TOPIC} characters at most")
        fields["topic"] = meta.topic
        lines.append("changed the topic" if meta.topic else "removed the topic")
    if meta.avatar is not None and meta.remove_avatar:
        raise InvalidRoomMeta("either set the avatar or remove it")
    if meta.avatar is not None:
        check_avatar(meta.avatar)
        fields["avatar"] = meta.avatar.to_cbor()
        lines.append("changed the room avatar")
    elif meta.remove_avatar:
        fields["avatar"] = None
        lines.append("removed the room avatar")
    if not fields:
        raise InvalidRoomMeta("nothing to change: give a name, a topic or an avatar")
    return Content(body="; ".join(lines), kind="notice", extra={FIELD: fields})


def _avatar_of(fields: dict[Any, Any]) -> tuple[MediaRef | None, bool] | None:
    """(avatar, removed) from a room_meta map; None: no usable avatar field."""
    if "avatar" not in fields:
        return None
    value = fields["avatar"]
    if value is None:
        return None, True
    if not isinstance(value, dict):
        return None
    try:
        ref = MediaRef.from_cbor(value)
        check_avatar(ref)
    except (MediaError, InvalidRoomMeta):
        return None
    return ref, False


def meta_of(content: Content) -> RoomMeta | None:
    """The change a message carries (None: not a metadata message, or a malformed one)."""
    fields = content.extra.get(FIELD)
    if not isinstance(fields, dict):
        return None
    name, topic = fields.get("name"), fields.get("topic")
    name = name[:MAX_NAME] if isinstance(name, str) else None
    topic = topic[:MAX_TOPIC] if isinstance(topic, str) else None
    avatar, removed = _avatar_of(fields) or (None, False)
    if name is None and topic is None and avatar is None and not removed:
        return None
    return RoomMeta(name, topic, avatar, removed)


def applied(room: ClientRoom, message: ev.Message) -> ev.RoomMetaChanged | None:
    """Apply a decrypted message if it is a metadata change (then its event replaces the
    message's); None: an ordinary message."""
    meta = meta_of(message.content)
    if meta is None:
        return None
    changed: list[str] = []
    if meta.name is not None:
        room.name = meta.name
        changed.append("name")
    if meta.topic is not None:
        room.topic = meta.topic
        changed.append("topic")
    if meta.avatar is not None or meta.remove_avatar:
        room.avatar = meta.avatar
        changed.append("avatar")
    return ev.RoomMetaChanged(
        message.room_id,
        message.sender_id,
        message.log_index,
        message.timestamp_ms,
        room.name,
        room.topic,
        tuple(changed),
        room.avatar,
    )
