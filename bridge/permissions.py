"""Permission changes take effect: a Matrix user who lost the ``user`` permission loses the
Kalandra member the bridge holds for them.

Levels are read from the config at every use (matrix_users.py), so a demoted user's next message,
reaction or command is judged by the new level. What a lower level cannot undo by itself is
MLS membership: the member of a user without ``user`` (relay users speak through the bot's
leaf, and nobody else is a member) is removed by the bot with a Remove commit from every room
it is still in, at each start and after a reload of the permissions (SIGHUP), and its device
tokens are revoked (a native login with one would keep the member's identity). A user given
``user`` again is added back as before, when they join or speak in a portal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mautrix.util.config import yaml
from ruamel.yaml.error import YAMLError

from .config import PERMISSION_LEVELS
from .db.roster import bridged_mxids

if TYPE_CHECKING:
    from .context import BridgeContext

log = logging.getLogger("kalandra.bridge.permissions")

MEMBER_LEVELS = frozenset({"user", "admin"})


async def remove_unpermitted(bridge: BridgeContext) -> int:
    """Remove from the bot's rooms the members of Matrix users without ``user`` now; returns
    how many removals were committed. A failed room is logged and left for the next time."""
    bot = bridge.bot
    if bot.client is None:
        return 0
    removed = 0
    for member_id, mxid in (await bridged_mxids(bridge.db)).items():
        if bridge.config.permission_level(mxid) in MEMBER_LEVELS:
            continue
        user = bridge.bridged_users.find(mxid)
        if user is not None:
            await user.close()  # its loopback session: nothing more goes out as it
        assert bridge.kalandra is not None
        await bridge.kalandra.store.revoke_tokens(member_id)
        for room_id in list(bot.core.rooms):
            try:
                removed += await _remove(bridge, room_id, member_id)
            except Exception as exc:
                log.warning(
                    "member %d not removed from %s (%s); next start or reload retries",
                    member_id,
                    room_id.hex(),
                    type(exc).__name__,
                )
    return removed


async def _remove(bridge: BridgeContext, room_id: bytes, member_id: int) -> int:
    bot = bridge.bot
    assert bot.client is not None
    async with bot.commit_lock:
        room = bot.core.rooms.get(room_id)
        if room is None or not room.active or member_id not in room.roster():
            return 0
        index = await bot.client.remove(room_id, [member_id])
        await bot.state.flush()
    log.info(
        "member %d of a Matrix user without the user permission removed from %s (log index %d)",
        member_id,
        room_id.hex(),
        index,
    )
    return 1


def read_permissions(path: str) -> dict[str, str]:
    """``bridge.permissions`` as the config file says now; ValueError if a level is unknown."""
    with open(Path(path), encoding="utf-8") as fh:
        data: Any = yaml.load(fh)
    permissions = ((data or {}).get("bridge") or {}).get("permissions") or {}
    if not isinstance(permissions, dict):
        raise ValueError("bridge.permissions is not a map")
    for who, level in permissions.items():
        if level not in PERMISSION_LEVELS:
            raise ValueError(f"bridge.permissions[{who}]: {level!r} is not a permission level")
    return {str(who): str(level) for who, level in permissions.items()}


async def reload(bridge: BridgeContext) -> None:
    """SIGHUP: take ``bridge.permissions`` from the config file again (nothing else), then
    remove the members of users who lost ``user``. A bad file changes nothing."""
    try:
        permissions = read_permissions(bridge.config.path)
    except (OSError, ValueError, YAMLError) as exc:
        log.error("permissions not reloaded: %s", exc)
        return
    bridge.config["bridge.permissions"] = permissions
    log.info("permissions reloaded (%d entries)", len(permissions))
    removed = await remove_unpermitted(bridge)
    if removed:
        log.info("%d membership(s) of users without the user permission removed", removed)
