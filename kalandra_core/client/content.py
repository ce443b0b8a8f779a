"""What travels inside an encrypted AppMessage: a small CBOR map.

``{"type": "text", "body": str}`` plus optional ``format``/``formatted_body`` (HTML), a
``reply_to`` log index, ``edit_of`` log index (an edit: this body replaces that message's; the
wire's AppEdit has no payload, see extras.py), a ``mentions`` list of member ids (in ``extra``),
a ``notice``/``emote`` kind, and the media kinds (``image``, ``file``, ``audio``, ``video``,
``sticker``) with a ``media`` map (a :class:`~kalandra_core.media.MediaRef`). Unknown keys
are kept (forward compatible); a payload that is not such a map is shown as an undecodable
message rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..media.blob import KINDS as MEDIA_KINDS
from ..media.blob import MediaError, MediaRef

# A media kind carries a MediaRef under "media"; older clients show its body (the file name).
KINDS = frozenset({"text", "notice", "emote"}) | MEDIA_KINDS


@dataclass(frozen=True, slots=True)
class Content:
    body: str
    kind: str = "text"
    formatted_body: str | None = None  # HTML
    reply_to: int | None = None
    edit_of: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    media: MediaRef | None = None  # with a media kind (image, file, audio, video, sticker)

    def encode(self) -> bytes:
        data: dict[str, Any] = {"type": self.kind, "body": self.body}
        if self.formatted_body is not None:
            data["format"] = "html"
            data["formatted_body"] = self.formatted_body
        if self.reply_to is not None:
            data["reply_to"] = self.reply_to
        if self.edit_of is not None:
            data["edit_of"] = self.edit_of
        if self.media is not None:
            data["media"] = self.media.to_cbor()
        data.update({k: v for k, v in self.extra.items() if k not in data})
        return cbor2.dumps(data)

    @classmethod
    def decode(cls, data: bytes) -> Content:
        try:
            obj = cbor2.loads(data)
        except Exception:
            return cls(body="(undecodable message)", kind="notice")
        if not isinstance(obj, dict) or not isinstance(obj.get("body"), str):
            return cls(body="(undecodable message)", kind="notice")
        kind = obj.get("type") if obj.get("type") in KINDS else "text"
        known = {"type", "body", "format", "formatted_body", "reply_to", "edit_of", "media"}
        formatted = obj.get("formatted_body")
        reply_to = obj.get("reply_to")
        edit_of = obj.get("edit_of")
        media = None
        if isinstance(obj.get("media"), dict):
            try:
                media = MediaRef.from_cbor(obj["media"])
            except MediaError:
                media = None  # (shown by its body, like an older client would)
        return cls(
            body=obj["body"],
            kind=str(kind),
            formatted_body=formatted if isinstance(formatted, str) else None,
            reply_to=reply_to if isinstance(reply_to, int) else None,
            edit_of=edit_of if isinstance(edit_of, int) else None,
            extra={k: v for k, v in obj.items() if k not in known and isinstance(k, str)},
            media=media,
        )
