"""The pure parts of bridging relations: pills from mention lists, locations and reply fallbacks
toward Kalandra, mention lists kept by the message content, typing payloads."""

from __future__ import annotations

import cbor2
from mautrix.types import (
    EventID,
    Format,
    InReplyTo,
    LocationMessageEventContent,
    MessageType,
    RelatesTo,
    TextMessageEventContent,
    UserID,
)

from bridge.portal.relations import _with_pills
from bridge.portal.to_kalandra import kalandra_content
from kalandra_core.client.content import Content
from kalandra_core.client.extras import TYPING_TIMEOUT_MS, read_typing

GHOST = UserID("@kalandra_7:localhost")


def test_pills_replace_the_first_mention_of_each_name_without_overlap() -> None:
    mentions = [(GHOST, "bob (Kalandra)", "bob"), (UserID("@a:localhost"), "alice", "mx_a")]
    html = _with_pills("hi @bob, bob & alice <3\nbye", mentions)
    bob = '<a href="https://matrix.to/#/@kalandra_7:localhost">bob (Kalandra)</a>'
    alice = '<a href="https://matrix.to/#/@a:localhost">alice</a>'
    assert html == f"hi {bob}, bob &amp; {alice} &lt;3<br/>bye"
    # Two members with one name: each takes its own occurrence.
    twins = [(GHOST, "x", "x"), (UserID("@kalandra_8:localhost"), "x", "x")]
    assert _with_pills("x x", twins).count("<a href=") == 2
    # Not named in the text: no pill (m.mentions still lists them).
    assert _with_pills("hello", mentions) == "hello"


def test_locations_become_text_and_reply_fallbacks_are_dropped() -> None:
    location = LocationMessageEventContent(
        msgtype=MessageType.LOCATION, body="Zurich", geo_uri="geo:47.37,8.54"
    )
    converted = kalandra_content(location)
    assert converted == Content(body="Location: geo:47.37,8.54")
    reply = TextMessageEventContent(
        msgtype=MessageType.TEXT,
        body="> <@b:x> original\n> more\n\nthe answer",
        format=Format.HTML,
        formatted_body="<mx-reply><blockquote>original</blockquote></mx-reply><b>the answer</b>",
    )
    reply.relates_to = RelatesTo(in_reply_to=InReplyTo(event_id=EventID("$original")))
    converted = kalandra_content(reply)
    assert converted is not None
    assert (converted.body, converted.formatted_body) == ("the answer", "<b>the answer</b>")


def test_mention_lists_travel_in_the_content() -> None:
    content = Content(body="hi", reply_to=3, extra={"mentions": [7, 9]})
    decoded = Content.decode(content.encode())
    assert decoded == content
    assert decoded.extra["mentions"] == [7, 9]


def test_typing_payloads() -> None:
    assert read_typing(cbor2.dumps({"typing": True, "timeout_ms": 5000})) == (True, 5000)
    assert read_typing(cbor2.dumps({"typing": False, "timeout_ms": 5000})) == (False, 0)
    assert read_typing(b"") == (True, TYPING_TIMEOUT_MS)  # the bare opcode
    assert read_typing(cbor2.dumps({"typing": True, "timeout_ms": 10**9})) == (True, 120_000)
    assert read_typing(b"\xff") is None
    assert read_typing(cbor2.dumps(["not", "a", "map"])) is None
