"""A Matrix user of the bridge: its permission level, read from the config at every use.

The objects are cached (mautrix keeps one per user), their permissions are not: ``level`` and
the flags derived from it ask the config each time, so a permission changed in the config
(at a restart, or a reload with SIGHUP: permissions.py) decides the very next command or
message, and no cached value keeps a demoted user in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from mautrix.bridge import BasePortal, BasePuppet, BaseUser
from mautrix.types import UserID
from mautrix.util.bridge_state import BridgeState, BridgeStateEvent

from .db.roster import bridged_member

if TYPE_CHECKING:
    from mautrix.bridge import Bridge

    from .context import BridgeContext


class User(BaseUser):
    context: ClassVar[BridgeContext]  # the bridge as ours sees it (mautrix's own: ``bridge``)
    by_mxid: ClassVar[dict[UserID, User]] = {}

    def __init__(self, mxid: UserID) -> None:
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

    @classmethod
    def init_cls(cls, bridge: BridgeContext) -> None:
        cls.context = bridge
        cls.bridge = cast("Bridge", bridge)  # the process is mautrix's Bridge as well
        cls.az = bridge.az
        cls.loop = bridge.loop

    @classmethod
    def get_by_mxid(cls, mxid: UserID) -> User:
        user = cls.by_mxid.get(mxid)
        if user is None:
            user = cls.by_mxid[mxid] = cls(mxid)
        return user

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
