"""Room metadata messages: what a change carries, how a client applies it, what an old reader
sees, and what is refused."""

from __future__ import annotations

import pytest

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.room_meta import (
    MAX_NAME,
    InvalidRoomMeta,
    RoomMeta,
    applied,
    meta_content,
    meta_of,
)


class _Room:
    name = "created"
    topic = ""


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
