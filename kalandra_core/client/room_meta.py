"""Room metadata (name, topic) as end-to-end encrypted messages.

A change is an ordinary AppMessage whose content is a notice with a ``room_meta`` map
(``{"name": str}``, ``{"topic": str}`` or both): every member applies it in log order, so all
agree on the current name and topic, and the server never sees them. The notice's body is a
readable line ("changed the room name to ..."), which is what a client that does not know the
field shows. The name and topic given at room creation (GroupInfoData) are the server's
plaintext copy and the starting point; changes never update that copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import events as ev
from .content import Content

if TYPE_CHECKING:
    from .room import ClientRoom

FIELD = "room_meta"
MAX_NAME = 255  # characters, as Matrix clients expect of m.room.name
MAX_TOPIC = 4096


class InvalidRoomMeta(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RoomMeta:
    """A change: None leaves that field as it is."""

    name: str | None = None
    topic: str | None = None


def meta_content(meta: RoomMeta) -> Content:
    """The message that makes this change (refused when empty or too long)."""
    fields: dict[str, str] = {}
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
    if not fields:
        raise InvalidRoomMeta("nothing to change: give a name or a topic")
    return Content(body="; ".join(lines), kind="notice", extra={FIELD: fields})


def meta_of(content: Content) -> RoomMeta | None:
    """The change a message carries (None: not a metadata message, or a malformed one)."""
    fields = content.extra.get(FIELD)
    if not isinstance(fields, dict):
        return None
    name, topic = fields.get("name"), fields.get("topic")
    name = name[:MAX_NAME] if isinstance(name, str) else None
    topic = topic[:MAX_TOPIC] if isinstance(topic, str) else None
    if name is None and topic is None:
        return None
    return RoomMeta(name, topic)


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
    return ev.RoomMetaChanged(
        message.room_id,
        message.sender_id,
        message.log_index,
        message.timestamp_ms,
        room.name,
        room.topic,
        tuple(changed),
    )
