"""Ghosts: a native Kalandra member as ``@kalandra_<member id>:<domain>``.

A ghost is registered and named once (remembered in bridge_puppets), then joins portals through
its intent (mautrix invites it with the bot when needed). Its display name comes from
``bridge.displayname_template`` with the member id as the name for now (Kalandra profiles
arrive later).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mautrix.appservice import IntentAPI
from mautrix.types import UserID

from .db import PuppetRow, PuppetTable

if TYPE_CHECKING:
    from .bridge import KalandraBridge


class Puppet:
    by_member: ClassVar[dict[int, Puppet]] = {}

    def __init__(self, bridge: KalandraBridge, member_id: int, row: PuppetRow | None) -> None:
        self.bridge = bridge
        self.member_id = member_id
        config = bridge.config
        localpart = config["bridge.username_template"].format(userid=member_id)
        self.mxid = UserID(f"@{localpart}:{config['homeserver.domain']}")
        self.displayname = config["bridge.displayname_template"].format(
            displayname=member_id, userid=member_id
        )
        self.intent: IntentAPI = bridge.az.intent.user(self.mxid)
        self._ready = row is not None and row.displayname == self.displayname

    @classmethod
    async def get(cls, bridge: KalandraBridge, member_id: int) -> Puppet:
        puppet = cls.by_member.get(member_id)
        if puppet is None:
            row = await PuppetTable(bridge.db).get(member_id)
            puppet = cls.by_member.setdefault(member_id, cls(bridge, member_id, row))
        return puppet

    async def ensure_ready(self) -> None:
        """Registered on the homeserver, with its display name."""
        if self._ready:
            return
        await self.intent.ensure_registered()
        await self.intent.set_displayname(self.displayname)
        await PuppetTable(self.bridge.db).put(
            PuppetRow(self.member_id, self.mxid, self.displayname)
        )
        self._ready = True
