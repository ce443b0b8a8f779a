"""Relay mode: the message of a Matrix user with only the ``relay`` permission goes out through
the bot's own leaf, with the sender named in it by ``bridge.relay.message_formats`` (mautrix's
templates: $sender_displayname, $sender_username, $sender_mxid, $message, $body)."""

from __future__ import annotations

import html
from string import Template
from typing import TYPE_CHECKING

from kalandra_core.client.content import Content

if TYPE_CHECKING:
    from ..config import Config

_MSGTYPES = {"text": "m.text", "notice": "m.notice", "emote": "m.emote"}
_DEFAULT = "$sender_displayname: $message"


def relay_content(config: Config, sender: str, displayname: str | None, body: Content) -> Content:
    formats = config["bridge.relay.message_formats"] or {}
    template = Template(str(formats.get(_MSGTYPES.get(body.kind, "m.text"), _DEFAULT)))
    username = sender.removeprefix("@").split(":", 1)[0]
    name = displayname or username
    args = {
        "sender_mxid": sender,
        "sender_username": username,
        "sender_displayname": name,
        "message": body.body,
        "body": body.body,
    }
    text = template.safe_substitute(args)
    formatted = None
    if body.formatted_body is not None:
        escaped = {k: html.escape(v) for k, v in args.items()}
        formatted = template.safe_substitute(escaped | {"message": body.formatted_body})
    # An emote's template writes the "* name" itself: the result is plain text.
    kind = "text" if body.kind == "emote" else body.kind
    return Content(body=text, kind=kind, formatted_body=formatted)
