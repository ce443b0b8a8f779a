"""A native member's invitation of a Matrix user into the room, through the room's bridge.

A Kalandra room is invite-only, and a bridge in it is a guest, not a door: the bridge lets a
Matrix user into the room's portal (and makes their bridged member an MLS member) only when a
member asks for it. The invitation is an ordinary end-to-end encrypted AppMessage whose content
is a notice with a ``bridge_invite`` field naming the Matrix user (``@user:domain``): only the
room's members can read it (the bridge's bot among them), every member sees who invited whom,
and the server, which refuses frames of non-members, never sees it. The notice's body is a
readable line, which is what a client that does not know the field shows.
"""

from __future__ import annotations

import re

from .content import Content

FIELD = "bridge_invite"
MAX_MXID = 255  # the Matrix spec's limit on a user id
_MXID = re.compile(r"@[^:\s]+:[^\s]+")


class InvalidBridgeInvite(ValueError):
    pass


def is_matrix_user(text: str) -> bool:
    return len(text) <= MAX_MXID and _MXID.fullmatch(text) is not None


def invite_content(mxid: str) -> Content:
    """The message that invites ``mxid`` (refused when it is not a Matrix user id)."""
    if not is_matrix_user(mxid):
        raise InvalidBridgeInvite(f"{mxid!r} is not a Matrix user id (@user:domain)")
    return Content(
        body=f"invited {mxid} to this room through the Matrix bridge",
        kind="notice",
        extra={FIELD: mxid},
    )


def invited_mxid(content: Content) -> str | None:
    """The Matrix user a message invites (None: not an invitation, or a malformed one)."""
    value = content.extra.get(FIELD)
    return value if isinstance(value, str) and is_matrix_user(value) else None
