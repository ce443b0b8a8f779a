"""A ghost's display name in a portal follows the name its native member's messages carry
(``kalandra set-displayname``: the ``profile`` field of each message, client/profile.py).

A member's profile is read only from its own messages in the room, so the name is set per
portal: the ghost's ``m.room.member`` event there, before the message that carries a new name
is sent (in log order), so Matrix users see each message under the name it was sent with. A
message without a profile changes nothing, as in the native timeline (which keeps the last name
it saw). The name goes through ``bridge.displayname_template`` like the account name the ghost
is registered with. The state store tells whether the portal shows the name already, so a
message bridged again after a restart repeats nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mautrix.types import Membership, RoomID

from kalandra_core.client.content import Content
from kalandra_core.client.profile import MAX_NAME, profile_of
from kalandra_core.client.terminal import clean

if TYPE_CHECKING:
    from ..context import BridgeContext, Ghost

log = logging.getLogger("kalandra.bridge.ghost_profile")

MAX_DISPLAYNAME = 256  # Synapse refuses longer display names


def wanted_name(bridge: BridgeContext, member_id: int, content: Content) -> str | None:
    """The ghost's display name that ``content`` asks for (None: it names nobody)."""
    profile = profile_of(content)
    if profile is None or profile.displayname is None:
        return None
    name = " ".join(clean(profile.displayname).split())[:MAX_NAME]
    if not name:
        return None
    template = str(bridge.config["bridge.displayname_template"])
    return template.format(displayname=name, userid=member_id)[:MAX_DISPLAYNAME]


async def follow(bridge: BridgeContext, room: RoomID, puppet: Ghost, content: Content) -> None:
    """Before ``content`` (the member's message) goes to ``room`` from ``puppet``'s ghost."""
    name = wanted_name(bridge, puppet.member_id, content)
    if name is None:
        return
    member = await bridge.az.state_store.get_member(room, puppet.mxid)
    if member is not None and member.displayname == name:
        return
    extra: dict[str, Any] = {"displayname": name}
    if member is not None and member.avatar_url:
        extra["avatar_url"] = str(member.avatar_url)
    await puppet.intent.send_member_event(room, puppet.mxid, Membership.JOIN, extra)
    log.info("ghost %s has a new display name in %s", puppet.mxid, room)
