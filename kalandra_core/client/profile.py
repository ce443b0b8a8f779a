"""Who a member is, as its own messages say: the ``profile`` field of a message's content.

``{"displayname": str, "mxid": str}`` (both optional) inside the encrypted content of a
message: the sender describes itself, with every message it sends, so nobody else can name a
member (it is read only from that member's own messages) and the server never sees it. The
bridge sets it on the messages of bridged Matrix users (their Matrix display name in the portal,
and their MXID); a native client sets a display name its user chose (``kalandra
set-displayname``). Clients show a member by the profile of its latest message; members that
never sent one are shown by their member id. It is a claim, like a Matrix display name (a native
member could say it is any MXID): the timeline adds the member id to a name two members use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .content import Content
from .terminal import clean

FIELD = "profile"
MAX_NAME = 256  # characters, as Matrix display names


@dataclass(frozen=True, slots=True)
class Profile:
    displayname: str | None = None
    mxid: str | None = None

    def to_field(self) -> dict[str, str]:
        out = {}
        if self.displayname:
            out["displayname"] = self.displayname[:MAX_NAME]
        if self.mxid:
            out["mxid"] = self.mxid[:MAX_NAME]
        return out

    def label(self) -> str | None:
        """ "Name (@user:domain)", "Name", "@user:domain", or None for an empty profile."""
        name = " ".join(clean(self.displayname or "").split())[:MAX_NAME]
        mxid = "".join(clean(self.mxid or "").split())[:MAX_NAME]
        if name and mxid and name != mxid:
            return f"{name} ({mxid})"
        return name or mxid or None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def profile_of(content: Content) -> Profile | None:
    """The profile a message carries (None: none, or a malformed one)."""
    data = content.extra.get(FIELD)
    if not isinstance(data, dict):
        return None
    profile = Profile(_text(data.get("displayname")), _text(data.get("mxid")))
    return profile if profile.label() else None


def with_profile(content: Content, profile: Profile | None) -> Content:
    """``content`` carrying ``profile`` (unchanged when there is none to add)."""
    fields = profile.to_field() if profile is not None else {}
    if not fields:
        return content
    extra = dict(content.extra)
    extra[FIELD] = fields
    return Content(
        body=content.body,
        kind=content.kind,
        formatted_body=content.formatted_body,
        reply_to=content.reply_to,
        edit_of=content.edit_of,
        extra=extra,
        media=content.media,
    )
