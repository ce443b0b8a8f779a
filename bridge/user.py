"""A Matrix user of the bridge: its permission level from the config.

For now a user is only its permissions; the Kalandra identity the bridge holds for it (MLS
leaf, encrypted state) arrives with the bridge's tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mautrix.bridge import BasePortal, BasePuppet, BaseUser
from mautrix.types import UserID
from mautrix.util.bridge_state import BridgeState, BridgeStateEvent

from .db.roster import bridged_member

if TYPE_CHECKING:
    from .bridge import KalandraBridge


class User(BaseUser):
    bridge: KalandraBridge
    by_mxid: ClassVar[dict[UserID, User]] = {}

    def __init__(self, mxid: UserID, level: str) -> None:
        self.mxid = mxid
        super().__init__()
        self.level = level
        self.relay_whitelisted = level in ("relay", "user", "admin")
        self.is_whitelisted = level in ("user", "admin")
        self.is_admin = level == "admin"

    @classmethod
    def init_cls(cls, bridge: KalandraBridge) -> None:
        cls.bridge = bridge
        cls.az = bridge.az
        cls.loop = bridge.loop

    @classmethod
    def get_by_mxid(cls, mxid: UserID) -> User:
        user = cls.by_mxid.get(mxid)
        if user is None:
            user = cls.by_mxid[mxid] = cls(mxid, cls.bridge.config.permission_level(mxid))
        return user

    async def is_logged_in(self) -> bool:
        return False  # no Kalandra identity is held for anyone yet

    async def get_bridge_states(self) -> list[BridgeState]:
        """For mautrix's bridge-state endpoint: the Kalandra member the bridge holds for this
        user, if any (its remote id is the member id)."""
        member_id = await bridged_member(self.bridge.db, self.mxid)
        if member_id is None:
            return []
        return [BridgeState(state_event=BridgeStateEvent.CONNECTED, remote_id=str(member_id))]

    async def get_puppet(self) -> BasePuppet | None:
        return None

    async def get_portal_with(self, puppet: BasePuppet, create: bool = True) -> BasePortal | None:
        return None  # Kalandra has no 1:1 chats outside rooms
