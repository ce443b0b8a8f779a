"""A Matrix user of the bridge: its permission level, read from the config at every use.

The objects are cached (mautrix keeps one per user), their permissions are not: ``level`` and
the flags derived from it ask the config each time, so a permission changed in the config
(at a restart, or a reload with SIGHUP: permissions.py) decides the very next command or
message, and no cached value keeps a demoted user in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from mautrix.bridge import BasePortal, BasePuppet, BaseUser
from mautrix.types import UserID
from mautrix.util.bridge_state import BridgeState, BridgeStateEvent

from .db.roster import bridged_member

if TYPE_CHECKING:
    from mautrix.bridge import Bridge

    from .context import BridgeContext


class MatrixUsers:
    """The Matrix users the bridge has met (mautrix keeps one object per user): one directory
    per bridge process, the Matrix handler's."""

    def __init__(self, context: BridgeContext) -> None:
        self.context = context
        self._by_mxid: dict[UserID, MatrixUser] = {}

    def get(self, mxid: UserID) -> MatrixUser:
        user = self._by_mxid.get(mxid)
        if user is None:
            user = self._by_mxid[mxid] = MatrixUser(self.context, mxid)
        return user


class MatrixUser(BaseUser):
    def __init__(self, context: BridgeContext, mxid: UserID) -> None:
        self.context = context  # the bridge as ours sees it
        # mautrix's own view of it: the process is mautrix's Bridge as well.
        self.bridge = cast("Bridge", context)
        self.az = context.az
        self.loop = context.loop
        self.mxid = mxid
        super().__init__()

    @property
    def level(self) -> str:
        return self.context.config.permission_level(self.mxid)

    # mautrix reads (and BaseUser.__init__ writes) these as attributes: derived, never stored.
    @property
    def relay_whitelisted(self) -> bool:
        return self.level in ("relay", "user", "admin")

    @relay_whitelisted.setter
    def relay_whitelisted(self, _value: bool) -> None:
        pass

    @property
    def is_whitelisted(self) -> bool:
        return self.level in ("user", "admin")

    @is_whitelisted.setter
    def is_whitelisted(self, _value: bool) -> None:
        pass

    @property
    def is_admin(self) -> bool:
        return self.level == "admin"

    @is_admin.setter
    def is_admin(self, _value: bool) -> None:
        pass

    async def is_logged_in(self) -> bool:
        return False  # no Kalandra identity is held for anyone yet

    async def get_bridge_states(self) -> list[BridgeState]:
        """For mautrix's bridge-state endpoint: the Kalandra member the bridge holds for this
        user, if any (its remote id is the member id)."""
        member_id = await bridged_member(self.context.db, self.mxid)
        if member_id is None:
            return []
        return [BridgeState(state_event=BridgeStateEvent.CONNECTED, remote_id=str(member_id))]

    async def get_puppet(self) -> BasePuppet | None:
        return None

    async def get_portal_with(self, puppet: BasePuppet, create: bool = True) -> BasePortal | None:
        return None  # Kalandra has no 1:1 chats outside rooms
