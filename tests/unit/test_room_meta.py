"""Room metadata messages: what a change carries, how a client applies it, what an old reader
sees, and what is refused."""

from __future__ import annotations

import os

import pytest

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.room import ClientRoom
from kalandra_core.client.room_meta import (
    MAX_AVATAR,
    MAX_NAME,
    InvalidRoomMeta,
    RoomMeta,
    applied,
    meta_content,
    meta_of,
)
from kalandra_core.media.blob import MediaRef
from kalandra_core.mls.group import MlsGroup


class _Room:
    name = "created"
    topic = ""
    avatar: MediaRef | None = None


def test_a_change_survives_the_wire_and_reads_as_a_notice() -> None:
    content = Content.decode(meta_content(RoomMeta(name="New", topic="About")).encode())
    assert meta_of(content) == RoomMeta("New", "About")
    assert content.kind == "notice"
    assert content.body == "renamed the room to 'New'; changed the topic"


def test_applying_keeps_the_unchanged_field() -> None:
    room = _Room()
    message = ev.Message(b"r" * 16, 7, 12, 1000, meta_content(RoomMeta(topic="T")))
    event = applied(room, message)  # type: ignore[arg-type]
    assert event == ev.RoomMetaChanged(b"r" * 16, 7, 12, 1000, "created", "T", ("topic",))
    assert (room.name, room.topic) == ("created", "T")


def test_ordinary_messages_are_not_changes() -> None:
    message = ev.Message(b"r" * 16, 7, 12, 1000, Content(body="hi"))
    assert applied(_Room(), message) is None  # type: ignore[arg-type]
    assert meta_of(Content(body="x", extra={"room_meta": {"name": 5}})) is None


@pytest.mark.parametrize(
    "meta", [RoomMeta(), RoomMeta(name="x" * (MAX_NAME + 1)), RoomMeta(topic="x" * 5000)]
)
def test_bad_changes_are_refused(meta: RoomMeta) -> None:
    with pytest.raises(InvalidRoomMeta):
        meta_content(meta)


def _image(**changes: object) -> MediaRef:
    fields: dict[str, object] = {"mimetype": "image/png", "name": "a.png", "kind": "image"}
    fields |= changes
    return MediaRef(b"m" * 32, b"k" * 32, 1234, **fields)  # type: ignore[arg-type]


def test_an_avatar_survives_the_wire_and_is_kept_by_the_room() -> None:
    content = Content.decode(meta_content(RoomMeta(avatar=_image(width=64, height=64))).encode())
    assert content.body == "changed the room avatar"
    assert meta_of(content) == RoomMeta(avatar=_image(width=64, height=64))
    room = _Room()
    event = applied(room, ev.Message(b"r" * 16, 7, 3, 9, content))  # type: ignore[arg-type]
    assert event is not None
    assert event.changed == ("avatar",)
    assert event.avatar == room.avatar == _image(width=64, height=64)
    # A name change afterwards leaves the avatar as it is.
    renamed = ev.Message(b"r" * 16, 7, 4, 9, meta_content(RoomMeta(name="n")))
    event = applied(room, renamed)  # type: ignore[arg-type]
    assert event is not None
    assert event.avatar == _image(width=64, height=64)


def test_an_avatar_can_be_removed() -> None:
    room = _Room()
    room.avatar = _image()
    content = Content.decode(meta_content(RoomMeta(remove_avatar=True)).encode())
    assert content.extra["room_meta"] == {"avatar": None}
    event = applied(room, ev.Message(b"r" * 16, 7, 5, 9, content))  # type: ignore[arg-type]
    assert event is not None
    assert (event.changed, event.avatar) == (("avatar",), None)
    assert getattr(room, "avatar") is None  # noqa: B009 (mypy narrowed it to the image above)


def test_a_malformed_avatar_is_not_a_change() -> None:
    broken = Content(body="x", extra={"room_meta": {"avatar": {"manifest": b"short"}}})
    assert meta_of(broken) is None
    not_image = Content(body="x", extra={"room_meta": {"avatar": _image(kind="file").to_cbor()}})
    assert meta_of(not_image) is None


@pytest.mark.parametrize(
    "meta",
    [
        RoomMeta(avatar=_image(kind="file", mimetype="application/pdf")),
        RoomMeta(avatar=_image(mimetype="text/plain")),
        RoomMeta(avatar=_image(), remove_avatar=True),
        RoomMeta(avatar=MediaRef(b"m" * 32, b"k" * 32, MAX_AVATAR + 1, "image/png", "", "image")),
    ],
)
def test_bad_avatars_are_refused(meta: RoomMeta) -> None:
    with pytest.raises(InvalidRoomMeta):
        meta_content(meta)


def test_the_saved_room_state_keeps_the_avatar() -> None:
    room = ClientRoom(b"r" * 16, MlsGroup.create(1, os.urandom(32)))
    assert ClientRoom.from_bytes(room.to_bytes()).avatar is None
    room.avatar = _image(width=8, height=8)
    assert ClientRoom.from_bytes(room.to_bytes()).avatar == _image(width=8, height=8)
