"""The access policy (access.py) where it meets events: a native member's invitation read from
the log, a Matrix invitation, a Matrix join, and what a Matrix user may send.

Each runs in its portal's queue (or, for a room without a portal, the bot's), so a grant is
recorded before the join it lets through is looked at.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from mautrix.api import Method, Path
from mautrix.errors import MForbidden, MNotFound
from mautrix.types import EventType, Membership, MessageStatusReason, UserID

from kalandra_core.backoff import retrying
from kalandra_core.client import events as ev

from .. import access
from .statuses import Refused

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace
    from ..portal_work import FromMatrix

log = logging.getLogger("kalandra.bridge.access")

NOT_INVITED = (
    "you were not invited into this Kalandra room (by one of its members, a portal moderator"
    " or a bridge admin)."
)


class RoomRef(Protocol):
    """A portal, or a room that has none yet."""

    @property
    def bridge(self) -> BridgeContext: ...
    @property
    def room_id(self) -> bytes: ...
    @property
    def hex(self) -> str: ...


def _is_native(bridge: BridgeContext, member_id: int) -> bool:
    return member_id != bridge.bot.member_id and member_id not in bridge.bridged_users.member_ids


async def native_invite(portal: RoomRef, message: ev.Message, mxid: UserID) -> bool:
    """(a): a native member's invitation, read in log order; the grant recorded. False: not
    to be followed (the sender is no native member, or the user may not use the bridge)."""
    bridge = portal.bridge
    if not _is_native(bridge, message.sender_id):
        return False
    if access.level_of(bridge, mxid) == "none":
        log.info("room %s: invitation of a user without bridge permission ignored", portal.hex)
        return False
    granted_by = f"member:{message.sender_id}"
    await access.grant(bridge, portal.room_id, mxid, granted_by, message.log_index)
    return True


async def invited_without_portal(bridge: BridgeContext, message: ev.Message, mxid: UserID) -> None:
    """(a) in a room that has no portal yet: the grant first (retried: the message is counted
    done only after it, so a crash replays it), then the message goes where such messages go
    (kept history, or nowhere), then the portal is made and the user invited behind that
    history (the history sends the invitation again at its own place in the log)."""

    standin = _Standin(bridge, message.room_id)
    followed = await retrying(
        lambda: native_invite(standin, message, mxid), "recording an invitation", log
    )
    bot = bridge.bot
    if bot.history is not None:
        bot.history.put(message)  # counted done once kept
    else:
        bot.state.message_done(message.room_id)
    if not followed:
        return
    room = bot.core.rooms.get(message.room_id)
    if room is None or not room.active:
        return
    try:
        portal = await bridge.portals.open(message.room_id)
        await portal.let_in(mxid, with_history=False)
    except Exception as exc:  # the grant stands: the user can `open` the portal
        log.warning("portal %s: not made (%s)", message.room_id.hex(), type(exc).__name__)


class _Standin:
    """What native_invite needs of a portal, for a room that has none yet."""

    def __init__(self, bridge: BridgeContext, room_id: bytes) -> None:
        self.bridge = bridge
        self.room_id = room_id
        self.hex = room_id.hex()


async def matrix_invite(portal: PortalFace, work: FromMatrix) -> None:
    """(b): an invitation in the portal by a user with invite power who is in the room
    themselves is a grant; any other leaves the invitee's join to be refused."""
    bridge = portal.bridge
    assert work.target is not None
    assert portal.mxid is not None
    inviter = work.sender
    if not await access.may_see(bridge, portal.room_id, inviter):
        return
    if not await access.has_invite_power(bridge, portal.mxid, inviter):
        return
    if access.level_of(bridge, work.target) == "none":
        return
    await access.grant(bridge, portal.room_id, work.target, f"matrix:{inviter}")


async def admit_join(portal: PortalFace, work: FromMatrix) -> bool:
    """A Matrix join: True when it may stand (then ``user``/``admin`` get their MLS leaf);
    else the joiner is kicked at once, before anything more of the room reaches them."""
    bridge = portal.bridge
    user = work.sender
    if work.permission != "none" and await access.may_see(bridge, portal.room_id, user):
        return True
    mxid = portal.mxid
    assert mxid is not None
    intent = bridge.az.intent
    path = Path.v3.rooms[mxid].state[str(EventType.ROOM_MEMBER)][user]
    try:
        content = await intent.api.request(Method.GET, path)
    except MNotFound:
        content = {}
    if content.get("membership") == Membership.JOIN.value:
        try:
            await intent.kick_user(mxid, user, access.KICK_REASON)
        except MForbidden as exc:  # the bot lacks the power: said in the log
            log.warning("portal %s: a joiner not let in could not be kicked", portal.hex)
            raise Refused(MessageStatusReason.NO_PERMISSION, NOT_INVITED) from exc
    log.info("portal %s: a Matrix join not let in was kicked", portal.hex)
    return False


async def check_sender(portal: PortalFace, work: FromMatrix) -> None:
    """Only who is in the room sends into it (a joiner not let in may speak before the kick
    lands): refused otherwise, and nothing is sent."""
    if not await access.may_see(portal.bridge, portal.room_id, work.sender):
        raise Refused(MessageStatusReason.NO_PERMISSION, NOT_INVITED)
