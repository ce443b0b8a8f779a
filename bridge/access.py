"""The access policy: who may enter a Kalandra room through the bridge.

A Kalandra room is invite-only, and the bridge is a guest in it, not a door: its native members
let the bot in for the Matrix users *they* want. A Matrix user enters a room's portal (a Matrix
invite by the bot, and an MLS leaf for their bridged member) only when

(a) a native member of the room invited them, with an end-to-end encrypted invitation in the
    room (``kalandra invite ROOM @user:domain``, kalandra_core/client/bridge_invite.py), which the
    bot reads in log order;
(b) someone already in the portal with invite power invited them in Matrix: a power level of at
    least :data:`INVITE_POWER` and at least the portal's own ``invite`` level (Synapse checks
    the latter; the bridge also wants the former, so that lowered power levels do not open the
    room to whoever is in it), and the inviter is in the room themselves;
(c) a bridge admin did so (``invite ROOM @user``, ``open``, ``create``).

Each such grant is recorded (table ``bridge_room_access``) and held in memory here; it goes when
the user leaves or is removed from the portal. "In the room" for commands and the provisioning
API: the user's bridged member is in the room's roster (as the bot's MLS state has it), or the
user holds a grant (invited, joined or about to). Bridge admins see every room. A Matrix join
that no grant covers (a room made public by hand, an invitation by someone without invite
power) is kicked at once, before anything of the room is sent to the joiner: a Matrix-only
member would read every message bridged into the room from then on.

Permission levels (``relay``/``user``/``admin``) say what a person may do *with* the bridge,
never which rooms they may enter; users without a level are never let in.

Portals use the ``invite`` join rule and the ``invited`` history visibility (a newcomer reads
the Matrix room from their invitation on, never what came before); portals are brought to both
at start. A ``public`` portal (the room's native admin opening it to the homeserver) is not
implemented.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.errors import MNotFound
from mautrix.types import EventType, RoomID, UserID

from .db.access import AccessTable
from .db.roster import bridged_member

if TYPE_CHECKING:
    from .context import BridgeContext

log = logging.getLogger("kalandra.bridge.access")

INVITE_POWER = 50  # a moderator's, in Matrix's usual levels
JOIN_RULE = "invite"
HISTORY_VISIBILITY = "invited"
_NARROW_ENOUGH = ("invited", "joined")
NOT_IN_ROOM = "`{room}` is not a Kalandra room you are in."
KICK_REASON = (
    "Not invited: a Kalandra room's portal is entered only on the invitation of one of its"
    " members, of a portal moderator, or of a bridge admin."
)


async def load(bridge: BridgeContext) -> None:
    granted = bridge.run_state.granted
    granted.clear()
    for room_id, mxid in await AccessTable(bridge.db).all():
        granted.setdefault(room_id, set()).add(mxid)


async def grant(
    bridge: BridgeContext,
    room_id: bytes,
    mxid: UserID,
    granted_by: str,
    log_index: int | None = None,
) -> None:
    """Record that ``mxid`` may enter the room, on ``granted_by``'s word (see the table)."""
    await AccessTable(bridge.db).grant(room_id, mxid, granted_by, log_index)
    bridge.run_state.granted.setdefault(room_id, set()).add(mxid)
    log.info("room %s: a Matrix user was let in by %s", room_id.hex(), granted_by.split(":")[0])


async def revoke(bridge: BridgeContext, room_id: bytes, mxid: UserID) -> None:
    granted = bridge.run_state.granted
    if mxid not in granted.get(room_id, ()):
        return
    await AccessTable(bridge.db).revoke(room_id, mxid)
    granted[room_id].discard(mxid)


def is_granted(bridge: BridgeContext, room_id: bytes, mxid: UserID) -> bool:
    return mxid in bridge.run_state.granted.get(room_id, ())


def is_admin(bridge: BridgeContext, mxid: str) -> bool:
    return bool(bridge.config.permission_level(mxid) == "admin")


def level_of(bridge: BridgeContext, mxid: str) -> str:
    return str(bridge.config.permission_level(mxid))


async def member_in_room(bridge: BridgeContext, room_id: bytes, mxid: UserID) -> bool:
    """The user's bridged member is in the room's roster (the bot's MLS state)."""
    bot = getattr(bridge, "bot", None)
    if bot is None or bot.client is None:
        return False
    room = bot.core.rooms.get(room_id)
    if room is None or not room.active:
        return False
    member = await bridged_member(bridge.db, mxid)
    return member is not None and member in room.roster()


async def in_room(bridge: BridgeContext, room_id: bytes, mxid: UserID) -> bool:
    """The user is in the room (see the module doc): a roster member or granted entry."""
    if level_of(bridge, mxid) == "none":
        return False
    return is_granted(bridge, room_id, mxid) or await member_in_room(bridge, room_id, mxid)


async def may_see(bridge: BridgeContext, room_id: bytes, mxid: UserID) -> bool:
    """What room commands ask: admins see every room, others the rooms they are in."""
    return is_admin(bridge, mxid) or await in_room(bridge, room_id, mxid)


async def rooms_of(bridge: BridgeContext, mxid: UserID, rooms: list[bytes]) -> list[bytes]:
    """Those of ``rooms`` the user may see, in the same order."""
    return [room_id for room_id in rooms if await may_see(bridge, room_id, mxid)]


async def has_invite_power(bridge: BridgeContext, portal_mxid: RoomID, inviter: UserID) -> bool:
    """Invite power in the portal as the bridge counts it (see the module doc)."""
    try:
        levels = await bridge.az.intent.get_power_levels(portal_mxid, ignore_cache=True)
    except Exception as exc:  # unknown: no power
        log.warning("power levels not read (%s)", type(exc).__name__)
        return False
    level = levels.get_user_level(inviter)
    return bool(level >= INVITE_POWER and level >= (levels.invite or 0))


async def _state(bridge: BridgeContext, mxid: RoomID, event_type: EventType) -> dict[str, Any]:
    path = Path.v3.rooms[mxid].state[str(event_type)][""]
    try:
        content = await bridge.az.intent.api.request(Method.GET, path)
    except MNotFound:
        return {}
    return dict(content)


async def enforce_room_rules(bridge: BridgeContext, mxid: RoomID) -> None:
    """The portal's join rule is ``invite`` and its history visibility ``invited`` (or the
    narrower ``joined``): set them if someone changed them, or the portal predates the rule."""
    intent = bridge.az.intent
    try:
        if (await _state(bridge, mxid, EventType.ROOM_JOIN_RULES)).get("join_rule") != JOIN_RULE:
            rule: dict[str, Any] = {"join_rule": JOIN_RULE}
            await intent.send_state_event(mxid, EventType.ROOM_JOIN_RULES, rule)
            log.info("portal %s: join rule set to %s", mxid, JOIN_RULE)
        visibility = await _state(bridge, mxid, EventType.ROOM_HISTORY_VISIBILITY)
        if visibility.get("history_visibility") not in _NARROW_ENOUGH:
            narrow: dict[str, Any] = {"history_visibility": HISTORY_VISIBILITY}
            await intent.send_state_event(mxid, EventType.ROOM_HISTORY_VISIBILITY, narrow)
            log.info("portal %s: history visibility set to %s", mxid, HISTORY_VISIBILITY)
    except Exception as exc:  # (the bot lacks the power): joins are still checked one by one
        log.warning("portal %s: access rules not set (%s)", mxid, type(exc).__name__)


def initial_state() -> list[dict[str, Any]]:
    """The rules as initial state of a new portal."""
    return [
        {"type": str(EventType.ROOM_JOIN_RULES), "content": {"join_rule": JOIN_RULE}},
        {
            "type": str(EventType.ROOM_HISTORY_VISIBILITY),
            "content": {"history_visibility": HISTORY_VISIBILITY},
        },
    ]
