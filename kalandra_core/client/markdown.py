"""``kalandra send --markdown``: CommonMark to the HTML body Matrix clients show.

The CLI imports this module only when a message is sent with ``--markdown``, so the other
commands do not load markdown-it-py. Raw HTML in the text is not passed through (it shows as
typed), and strikethrough (``~~text~~``) is on, as in Matrix clients. The plain body is the
Markdown as typed, as Matrix clients send it (the bridge gives Matrix the HTML's text as the
plain body when the two differ). Text with no formatting gets no HTML body.
"""

from __future__ import annotations

import html
import re

from markdown_it import MarkdownIt


def _plain_paragraph(rendered: str, text: str) -> bool:
    """The HTML is only the text as one paragraph (nothing worth a formatted body)."""
    match = re.fullmatch(r"<p>(.*)</p>\n?", rendered, flags=re.DOTALL)
    return match is not None and html.unescape(match.group(1)) == text.strip()


def render(text: str) -> tuple[str, str | None]:
    """(plain body, HTML body or None) of Markdown ``text``."""
    md = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")
    rendered = md.render(text)
    if _plain_paragraph(rendered, text):
        return text, None
    return text, rendered.strip()
