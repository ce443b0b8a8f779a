"""What `kalandra history` and `tail` print: the timeline (edits, replies, reactions, removals,
names) and the HTML renderer for terminals (the bridge tests run them end to end)."""

from __future__ import annotations

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.profile import Profile, profile_of, with_profile
from kalandra_core.client.terminal import html_to_terminal
from kalandra_core.client.timeline import Timeline

ROOM = bytes(16)
STAMP = 1_700_000_000_000


def message(index: int, sender: int, body: str, **fields: object) -> ev.Message:
    return ev.Message(ROOM, sender, index, STAMP, Content(body=body, **fields))  # type: ignore[arg-type]


def texts(timeline: Timeline) -> list[str]:
    """Each line without its log index and time."""
    return [line.split(" ", 3)[3] if line.startswith("#") else line for line in timeline.lines()]


def test_an_edit_by_someone_else_is_a_message_not_an_edit() -> None:
    timeline = Timeline()
    for entry in (message(1, 7, "mine"), message(2, 8, "hijack", edit_of=1)):
        timeline.add(entry)
    assert texts(timeline) == ["<7> mine", "<8> hijack"]


def test_edits_of_edits_and_a_removed_edit() -> None:
    timeline = Timeline()
    timeline.add(message(1, 7, "one"))
    assert timeline.add(message(2, 7, "two", edit_of=1))[0].endswith("<7> two (edited)")
    timeline.add(message(3, 7, "three", edit_of=2))  # names the edit: applies to the original
    assert texts(timeline) == ["<7> three (edited)"]
    timeline.add(ev.Moderated(ROOM, 4, "redact", 9, 3))
    assert texts(timeline) == ["<7> two (edited)"]


def test_reactions_follow_the_log_and_their_redaction() -> None:
    timeline = Timeline()
    timeline.add(message(1, 7, "hi", extra={"profile": {"displayname": "Ann"}}))
    timeline.add(ev.Reacted(ROOM, 8, 2, 1, "👍", True))
    timeline.add(ev.Reacted(ROOM, 7, 3, 1, "👍", True))
    timeline.add(ev.Reacted(ROOM, 7, 4, 1, "🎉", True))
    assert texts(timeline) == ["<Ann> hi", "    [👍 8, Ann]  [🎉 Ann]"]
    assert timeline.add(ev.Reacted(ROOM, 8, 5, 1, "👍", False)) == ["#5 <8> took back 👍 from #1"]
    assert timeline.add(ev.Moderated(ROOM, 6, "redact", 9, 4)) == [
        "#6 <9> removed a reaction to #1"
    ]
    assert texts(timeline) == ["<Ann> hi", "    [👍 Ann]"]


def test_a_reply_quotes_its_target_and_a_removed_one() -> None:
    timeline = Timeline()
    timeline.add(message(1, 7, "first line\nsecond"))
    timeline.add(message(2, 8, "answer", reply_to=1))
    timeline.add(message(3, 8, "to the unknown", reply_to=99))
    assert texts(timeline) == [
        "<7> first line\n    second",
        "  > #1 <7> first line second",
        "<8> answer",
        "  > #99 (not in this history)",
        "<8> to the unknown",
    ]
    timeline.add(ev.Moderated(ROOM, 4, "redact", 7, 1))
    assert texts(timeline)[:3] == [
        "<7> (message removed)",
        "  > #1 (message removed)",
        "<8> answer",
    ]


def test_names_come_from_the_members_own_messages() -> None:
    timeline = Timeline()
    bridged = Profile("Alice", "@alice:example.org")
    timeline.add(ev.Message(ROOM, 7, 1, STAMP, with_profile(Content(body="a"), bridged)))
    timeline.add(ev.Message(ROOM, 7, 2, STAMP, Content(body="b")))  # the name stays
    assert texts(timeline) == ["<Alice (@alice:example.org)> a", "<Alice (@alice:example.org)> b"]
    assert profile_of(Content(body="x", extra={"profile": {"displayname": 5}})) is None
    # A name another member also claims comes with the member id (no look-alikes).
    timeline.add(ev.Message(ROOM, 8, 3, STAMP, with_profile(Content(body="c"), bridged)))
    assert texts(timeline)[1:] == [
        "<Alice (@alice:example.org) [7]> b",
        "<Alice (@alice:example.org) [8]> c",
    ]
    # Spaces and control characters cannot fake a line or drive the terminal.
    assert Profile("Eve\n#9 <7>\x1b[2J", None).label() == "Eve #9 <7>[2J"


def test_room_changes_are_lines() -> None:
    timeline = Timeline()
    meta = {"room_meta": {"name": "New", "topic": ""}}
    timeline.add(message(1, 7, "renamed", kind="notice", extra=meta))
    assert texts(timeline) == ["<7> renamed the room to 'New'; removed the topic"]


def test_html_for_a_terminal() -> None:
    html = (
        "<mx-reply><blockquote>fallback</blockquote></mx-reply>"
        '<p><strong>bold</strong>, <em>it</em>, <a href="https://example.org">site</a>,'
        ' <a href="https://example.org">https://example.org</a> and <code>x\x1b[31m</code></p>'
        "<ul><li>one</li><li>two</li></ul><ol start='3'><li>three</li></ol>"
        "<blockquote>quoted</blockquote><pre><code>a\n  b\n</code></pre>"
    )
    assert html_to_terminal(html) == (
        "**bold**, _it_, site <https://example.org>, https://example.org and `x[31m`\n"
        "• one\n• two\n3. three\n> quoted\na\n  b"
    )
    coloured = html_to_terminal("<b>x</b> <img src='mxc://a/b' alt='cat'>", ansi=True)
    assert coloured == "\x1b[1mx\x1b[22m [image: cat]"


def test_markdown_bodies() -> None:
    from kalandra_core.client.markdown import render

    assert render("just text & more") == ("just text & more", None)  # no HTML body
    body, html = render("**hi** <b>raw</b> ~~old~~")
    assert body == "**hi** <b>raw</b> ~~old~~"  # as typed, as Matrix clients send it
    assert html == "<p><strong>hi</strong> &lt;b&gt;raw&lt;/b&gt; <s>old</s></p>"
