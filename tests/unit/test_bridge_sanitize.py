"""The HTML sanitizer of formatted messages (bridge/convert/formatting.py), both directions'
rules."""

from __future__ import annotations

import re

from mautrix.types import Format, MessageType, TextMessageEventContent

from bridge.convert.formatting import MAX_DEPTH, MAX_HTML, formatted_message, sanitize
from bridge.portal import kalandra_content, matrix_content
from kalandra_core.client.content import Content

HOSTILE = (
    '<script>alert("s")</script><style>p{}</style>'
    '<a href="javascript:alert(1)" onclick="x()">js</a> '
    '<a href="data:text/html,<script>x</script>">data</a> '
    '<a href="JaVaScRiPt:alert(1)">mixed</a> '
    '<a href="https://example.org/" target="_blank" rel="x">ok</a> '
    '<img src="data:image/png;base64,AAAA" onerror="x()">'
    '<img src="https://tracker.example/p.png" alt="t">'
    '<img src="mxc://localhost/abc" width="10" height="x" alt="cat">'
    '<iframe src="https://evil.example/"></iframe><object data="x"></object>'
    '<svg><g onload="x()">svg</g></svg><form action="x"><input value="v"></form>'
    '<p style="color:red" class="c" id="i">para</p>'
    '<code class="language-python bad">x = 1</code>'
    '<span data-mx-spoiler="why" data-mx-color="#00ff00" data-mx-bg-color="red">sp</span>'
    '<font color="#ff0000" face="x">f</font><ol start="3" type="a"><li>three</li></ol>'
    "<!-- comment --><mx-reply><blockquote>quoted</blockquote></mx-reply>"
)


def tags_and_attributes(html: str) -> list[str]:
    return re.findall(r"<[^>]*>", html)


def test_hostile_html_is_reduced_to_the_matrix_spec_allow_list() -> None:
    clean, text = sanitize(HOSTILE)
    lowered = clean.lower()
    for forbidden in (
        "<script", "<style", "javascript:", "data:", "onclick", "onerror", "onload", "<iframe",
        "<object", "<svg", "<form", "<input", "style=", "id=", "rel=", "tracker.example",
        "comment", "quoted", "face=", "type=", 'height="x"', "bad", 'bg-color="red"',
    ):  # fmt: skip
        assert forbidden not in lowered, forbidden
    assert '<a href="https://example.org/" target="_blank">ok</a>' in clean
    assert '<img src="mxc://localhost/abc" width="10" alt="cat">' in clean
    assert '<code class="language-python">x = 1</code>' in clean
    assert '<span data-mx-spoiler="why" data-mx-color="#00ff00">sp</span>' in clean
    assert '<font color="#ff0000">f</font><ol start="3"><li>three</li></ol>' in clean
    for word in ("js", "data", "mixed", "ok (https://example.org/)", "cat", "para", "x = 1"):
        assert word in text, word
    assert "alert" not in text
    assert "quoted" not in text
    # Idempotent: sanitized HTML passes unchanged.
    assert sanitize(clean) == (clean, text)


def test_nesting_is_bounded_and_the_text_kept() -> None:
    deep = "<div>" * 5000 + "<b>deep</b> text" + "</div>" * 5000
    clean, text = sanitize(deep)
    depth = best = 0
    for tag in tags_and_attributes(clean):
        depth += -1 if tag.startswith("</") else 1
        best = max(best, depth)
    assert best == MAX_DEPTH
    assert text == "deep text"
    assert clean.count("<") == 2 * MAX_DEPTH


def test_the_plain_body_says_what_the_formatted_body_says() -> None:
    # Agreeing bodies (whitespace aside) are kept as they are.
    assert formatted_message("hi  there", "<b>hi</b> there") == ("hi  there", "<b>hi</b> there")
    # A plain body that says something else is replaced by the formatted body's text.
    assert formatted_message("pay Bob", "<b>pay Mallory</b>") == (
        "pay Mallory",
        "<b>pay Mallory</b>",
    )
    body, _ = formatted_message("a", "<p>first</p><ul><li>x</li><li>y</li></ul>line<br>two")
    assert body == "first\n- x\n- y\nline\ntwo"
    # Nothing visible left: plain text only, the plain body kept.
    assert formatted_message("hello", "<script>x</script><img src='https://e/p.png'>") == (
        "hello",
        None,
    )
    # Too long for any Matrix event: plain text only.
    assert formatted_message("long", "<b>x</b>" * (MAX_HTML // 8 + 1)) == ("long", None)


def test_both_directions_sanitize() -> None:
    hostile = '<b>bold</b><script>steal()</script><a href="javascript:x">link</a>'
    incoming = TextMessageEventContent(
        msgtype=MessageType.TEXT, body="hidden words", format=Format.HTML, formatted_body=hostile
    )
    to_kalandra = kalandra_content(incoming)
    assert to_kalandra is not None
    assert to_kalandra.formatted_body == "<b>bold</b><a>link</a>"
    assert to_kalandra.body == "boldlink"
    to_matrix = matrix_content(Content(body="hidden words", formatted_body=hostile))
    assert to_matrix.formatted_body == "<b>bold</b><a>link</a>"
    assert to_matrix.body == "boldlink"
    assert to_matrix.format == Format.HTML


def test_what_is_not_a_string_counts_as_absent() -> None:
    assert formatted_message(None, "<b>x</b>") == ("x", "<b>x</b>")
    assert formatted_message("x", 42) == ("x", None)
    assert formatted_message(["x"], {"html": 1}) == ("", None)
