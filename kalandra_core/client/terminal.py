"""Formatted message bodies (Matrix's HTML subset) rendered for a terminal, with no network.

:func:`html_to_terminal` walks the HTML with the standard library's parser: bold, italics,
strikethrough, inline code and code blocks, links (the text, then the address when it says
something else), quotes, lists, headings and line breaks. With ``ansi`` the styles are SGR
escapes; without, they are the plain marks people type (``**bold**``, ``_it_``, ``` `code` ```).
Images show as ``[image: alt]`` (never fetched). Anything else keeps its text. Every control
character of the message (an escape sequence a sender hid in it) is dropped before styling, so a
message cannot drive the terminal: :func:`clean` does the same for plain bodies.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# tag -> (ANSI on, ANSI off, plain mark)
_INLINE = {
    "b": ("\x1b[1m", "\x1b[22m", "**"),
    "strong": ("\x1b[1m", "\x1b[22m", "**"),
    "i": ("\x1b[3m", "\x1b[23m", "_"),
    "em": ("\x1b[3m", "\x1b[23m", "_"),
    "u": ("\x1b[4m", "\x1b[24m", "_"),
    "del": ("\x1b[9m", "\x1b[29m", "~~"),
    "s": ("\x1b[9m", "\x1b[29m", "~~"),
    "strike": ("\x1b[9m", "\x1b[29m", "~~"),
    "code": ("\x1b[36m", "\x1b[39m", "`"),
}
_BLOCK = {"p", "div", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6"}
_BLOCK |= {"table", "tr", "hr", "details", "summary"}
_SKIP = {"mx-reply", "script", "style"}  # a reply fallback: the reply is shown as such
_LINK_ON, _LINK_OFF = "\x1b[4;34m", "\x1b[24;39m"


def clean(text: str) -> str:
    """The text without control characters (newlines and tabs kept)."""
    return _CONTROL.sub("", text)


class _Renderer(HTMLParser):
    def __init__(self, ansi: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.ansi = ansi
        self.out: list[str] = []
        self._skip = 0
        self._pre = 0
        self._quote = 0
        self._lists: list[int | None] = []  # per open list: the next number (None: bullets)
        self._links: list[str | None] = []  # per open <a>: its address
        self._link_text: list[list[str]] = []

    # --- helpers -----------------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if self._link_text:
            self._link_text[-1].append(text)
        self.out.append(text)

    def _newline(self) -> None:
        text = "".join(self.out)
        if text and not text.endswith("\n"):
            self.out.append("\n")
        if self._quote:
            self.out.append("> " * self._quote)

    def _style(self, tag: str, on: bool) -> None:
        start, stop, mark = _INLINE[tag]
        if tag == "code" and self._pre:
            return  # a code block is set apart by its lines
        self._emit((start if on else stop) if self.ansi else mark)

    # --- parser callbacks --------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
            return
        if self._skip:
            return
        if tag in _INLINE:
            self._style(tag, True)
        elif tag == "br":
            self._newline()
        elif tag == "a":
            self._links.append(dict(attrs).get("href"))
            self._link_text.append([])
            if self.ansi:
                self.out.append(_LINK_ON)
        elif tag == "img":
            alt = dict(attrs).get("alt") or dict(attrs).get("title") or ""
            self._emit(f"[image: {clean(alt)}]" if alt else "[image]")
        elif tag in _BLOCK:
            if tag == "blockquote":
                self._quote += 1
            if tag == "pre":
                self._pre += 1
            self._newline()
            if tag in ("ul", "ol"):
                start = dict(attrs).get("start")
                first = int(start) if start and start.isdigit() else 1
                self._lists.append(first if tag == "ol" else None)
            elif tag == "li":
                depth = max(len(self._lists) - 1, 0)
                number = self._lists[-1] if self._lists else None
                self.out.append("  " * depth + (f"{number}. " if number is not None else "• "))
                if self._lists and number is not None:
                    self._lists[-1] = number + 1
            elif tag.startswith("h") and tag[1:].isdigit():
                self._emit("\x1b[1m" if self.ansi else "#" * int(tag[1:]) + " ")
            elif tag == "hr":
                self.out.append("―" * 20)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(self._skip - 1, 0)
            return
        if self._skip:
            return
        if tag in _INLINE:
            self._style(tag, False)
        elif tag == "a" and self._links:
            href = self._links.pop()
            text = "".join(self._link_text.pop())
            if self.ansi:
                self.out.append(_LINK_OFF)
            if href and _plain(href) != _plain(text):
                self._emit(f" <{clean(href)}>")
        elif tag in _BLOCK:
            if tag.startswith("h") and tag[1:].isdigit() and self.ansi:
                self._emit("\x1b[22m")
            if tag in ("ul", "ol") and self._lists:
                self._lists.pop()
            if tag == "blockquote":
                self._quote = max(self._quote - 1, 0)
            if tag == "pre":
                self._pre = max(self._pre - 1, 0)
            self._newline()

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        text = clean(data)
        if not self._pre:
            text = re.sub(r"\s+", " ", text)
            if "".join(self.out).endswith(("\n", "> ", "• ", ". ")) and text.startswith(" "):
                text = text.lstrip()
        elif self._quote:
            text = text.replace("\n", "\n" + "> " * self._quote)
        self._emit(text)


def _plain(url: str) -> str:
    return url.removeprefix("mailto:").removeprefix("https://").removeprefix("http://").rstrip("/")


def html_to_terminal(html: str, *, ansi: bool = False) -> str:
    """The HTML's text for a terminal (see the module's docstring)."""
    renderer = _Renderer(ansi)
    renderer.feed(html)
    renderer.close()
    text = "".join(renderer.out)
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1].strip("> "):
        lines.pop()
    while lines and not lines[0].strip("> "):
        lines.pop(0)
    return "\n".join(lines)
