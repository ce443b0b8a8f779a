"""HTML of formatted messages, sanitized in both directions (Matrix -> Kalandra and back).

The allowed tags and attributes are the Matrix spec's for ``m.room.message`` (client-server
API, "HTML"); everything else is dropped by nh3 (ammonia) with its text kept, except the
contents of ``script``/``style`` and of ``mx-reply`` (a reply fallback: the reply is carried
as a relation, and a Kalandra client would show the quoted text as the message's own).
Links may be http(s), ftp, mailto or magnet; images only ``mxc://``. Nesting deeper than
100 elements (the spec's advice) is flattened: the deeper tags go, their text stays. A
formatted body over 64 KiB (no Matrix event can carry one) is dropped: plain text only.

No hidden text: the plain body must say what the formatted body says. The text of the
sanitized HTML is derived (line breaks for blocks, list bullets, link targets, image alt
text); when it differs from the plain body (ignoring whitespace) the derived text becomes the
plain body, so a client showing either shows the same words. A formatted body with no text
left (``<script>`` only, say) is dropped and the plain body stays.
"""

from __future__ import annotations

import re
from html import escape
from html.parser import HTMLParser

import nh3

MAX_DEPTH = 100
MAX_HTML = 65536  # characters of formatted body looked at, at most

_TAGS = frozenset(
    {
        "font", "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol",
        "sup", "sub", "li", "b", "i", "u", "strong", "em", "strike", "code", "hr", "br", "div",
        "table", "thead", "tbody", "tr", "th", "td", "caption", "pre", "span", "img",
        "details", "summary",
    }
)  # fmt: skip
_COLORS = {"data-mx-bg-color", "data-mx-color"}
_ATTRIBUTES = {
    "font": {*_COLORS, "color"},
    "span": {*_COLORS, "data-mx-spoiler"},
    "a": {"href", "target"},
    "img": {"width", "height", "alt", "title", "src"},
    "ol": {"start"},
    "code": {"class"},
}
_LINK_SCHEMES = {"http", "https", "ftp", "mailto", "magnet"}
_DROPPED_WITH_CONTENT = {"script", "style", "mx-reply"}
_VOID = frozenset({"br", "hr", "img"})
_BLOCKS = frozenset(
    {
        "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "ul", "ol", "li",
        "table", "thead", "tbody", "tr", "caption", "details", "summary", "hr",
    }
)  # fmt: skip
_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
_LANGUAGE = re.compile(r"language-[A-Za-z0-9_+#.-]{1,40}")
_NUMBER = re.compile(r"[0-9]{1,9}")


def _attribute(tag: str, name: str, value: str) -> str | None:
    """Values the spec gives a meaning, others dropped (nh3 calls this per attribute)."""
    if name in _COLORS or name == "color":
        return value if _COLOR.fullmatch(value) else None
    if tag == "img" and name == "src":
        return value if value.startswith("mxc://") else None
    if tag == "a" and name == "href":
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        return value if scheme in _LINK_SCHEMES else None
    if tag == "a" and name == "target":
        return "_blank" if value == "_blank" else None
    if tag == "code" and name == "class":
        kept = [c for c in value.split() if _LANGUAGE.fullmatch(c)]
        return kept[0] if kept else None
    if name in ("start", "width", "height"):
        return value if _NUMBER.fullmatch(value) else None
    return value


def _clean(html: str) -> str:
    return nh3.clean(
        html,
        tags=set(_TAGS),
        clean_content_tags=set(_DROPPED_WITH_CONTENT),
        attributes={tag: set(names) for tag, names in _ATTRIBUTES.items()},
        attribute_filter=_attribute,
        url_schemes=_LINK_SCHEMES | {"mxc"},
        url_relative="deny",
        link_rel=None,
        strip_comments=True,
    )


class _Flatten(HTMLParser):
    """Re-serializes nh3's (well-formed) output with at most MAX_DEPTH open elements, and
    derives its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.html: list[str] = []
        self.text: list[str] = []
        self._open: list[tuple[str, bool]] = []  # (tag, kept)
        self._depth = 0
        self._pre = 0
        self._lists: list[list[int] | None] = []  # per list: [next number] (ol) or None (ul)
        self._links: list[tuple[str, int]] = []  # (href, where its text starts)
        self._row_cells = 0
        self.visible = False  # any text or image at all

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img" and not dict(attrs).get("src"):
            return  # its source was not mxc://: nothing to show
        kept = tag in _VOID or self._depth < MAX_DEPTH
        if kept:
            self.html.append(_start(tag, attrs))
        if tag not in _VOID:
            self._open.append((tag, kept))
            self._depth += kept
        self._text_start(tag, dict(attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        while self._open:
            open_tag, kept = self._open.pop()
            self._depth -= kept
            if kept:
                self.html.append(f"</{open_tag}>")
            self._text_end(open_tag)
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self.html.append(escape(data, quote=False))
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
        if data.strip():
            self.visible = True
        self.text.append(data)

    def close(self) -> None:
        super().close()
        while self._open:
            tag, kept = self._open.pop()
            if kept:
                self.html.append(f"</{tag}>")

    # --- the text ---------------------------------------------------------------------------

    def _newline(self) -> None:
        if self.text and not "".join(self.text[-1:]).endswith("\n"):
            self.text.append("\n")

    def _text_start(self, tag: str, attrs: dict[str, str | None]) -> None:
        if tag in _BLOCKS:
            self._newline()
        if tag == "br":
            self.text.append("\n")
        elif tag == "hr":
            self.text.append("---\n")
        elif tag == "pre":
            self._pre += 1
        elif tag == "img":
            self.visible = True
            self.text.append(attrs.get("alt") or attrs.get("title") or "[image]")
        elif tag in ("ul", "ol"):
            start = attrs.get("start")
            self._lists.append([int(start) if start else 1] if tag == "ol" else None)
        elif tag == "li":
            numbering = self._lists[-1] if self._lists else None
            if numbering is None:
                self.text.append("- ")
            else:
                self.text.append(f"{numbering[0]}. ")
                numbering[0] += 1
        elif tag == "a":
            self._links.append((attrs.get("href") or "", len(self.text)))
        elif tag == "tr":
            self._row_cells = 0
        elif tag in ("td", "th"):
            if self._row_cells:
                self.text.append(" | ")
            self._row_cells += 1

    def _text_end(self, tag: str) -> None:
        if tag == "pre":
            self._pre -= 1
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        elif tag == "a" and self._links:
            href, start = self._links.pop()
            shown = "".join(self.text[start:]).strip()
            # A link's target is part of what it says, unless it is its own text or a pill.
            if href and href not in (shown, f"mailto:{shown}") and not _is_pill(href):
                self.text.append(f" ({href})")
        if tag in _BLOCKS:
            self._newline()


def _start(tag: str, attrs: list[tuple[str, str | None]]) -> str:
    parts = [tag]
    for name, value in attrs:
        parts.append(name if value is None else f'{name}="{escape(value, quote=True)}"')
    return f"<{' '.join(parts)}>"


def _is_pill(href: str) -> bool:
    return href.startswith("https://matrix.to/#/")


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _words(text: str) -> str:
    return " ".join(text.split())


def sanitize(html: str) -> tuple[str, str]:
    """The sanitized HTML and its text (both "" when nothing visible is left)."""
    flat = _Flatten()
    flat.feed(_clean(html))
    flat.close()
    if not flat.visible:
        return "", ""
    return "".join(flat.html), _tidy("".join(flat.text))


def formatted_message(body: object, html: object) -> tuple[str, str | None]:
    """(plain body, formatted body or None) for a message to send on, either way: the HTML
    sanitized, and the plain body the HTML's text when the two disagree. (Either may be
    anything a hostile sender put in the JSON: what is not a string counts as absent.)"""
    body = body if isinstance(body, str) else ""
    if not isinstance(html, str) or not html.strip() or len(html) > MAX_HTML:
        return body, None
    clean, text = sanitize(html)
    if not clean:
        return body, None
    if _words(text) != _words(body):
        body = text
    return body, clean
