"""Ghosts: a native Kalandra member as ``@kalandra_<member id>:<domain>``.

A ghost is registered and named once (remembered in bridge_puppets), then joins portals through
its intent (mautrix invites it with the bot when needed). Its display name comes from
``bridge.displayname_template``, with the member's Kalandra account name as ``{displayname}``
(the member id when the account is unknown to this server). In a portal, the name the member's
own messages carry there replaces it (ghost_profile.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.appservice import IntentAPI
from mautrix.types import UserID

from ..db import PuppetRow, PuppetTable

if TYPE_CHECKING:
    from ..context import BridgeContext


class Puppets:
    """The ghosts of native members: one directory per bridge process (app.py)."""

    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self._by_member: dict[int, Puppet] = {}

    async def get(self, member_id: int) -> Puppet:
        puppet = self._by_member.get(member_id)
        if puppet is None:
            bridge = self.bridge
            row = await PuppetTable(bridge.db).get(member_id)
            name = None
            if bridge.kalandra is not None:
                account = await bridge.kalandra.store.get_member(member_id)
                name = None if account is None else account.name
            puppet = self._by_member.setdefault(member_id, Puppet(bridge, member_id, row, name))
        return puppet


class Puppet:
    def __init__(
        self, bridge: BridgeContext, member_id: int, row: PuppetRow | None, name: str | None
    ) -> None:
        self.bridge = bridge
        self.member_id = member_id
        config = bridge.config
        self.mxid = mxid_of(bridge, member_id)
        self.displayname = config["bridge.displayname_template"].format(
            displayname=name or member_id, userid=member_id
        )
        self.intent: IntentAPI = bridge.az.intent.user(self.mxid)
        self._ready = row is not None and row.displayname == self.displayname

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


def mxid_of(bridge: BridgeContext, member_id: int) -> UserID:
    """The ghost's MXID of a member (no lookup: the username template decides)."""
    config = bridge.config
    localpart = config["bridge.username_template"].format(userid=member_id)
    return UserID(f"@{localpart}:{config['homeserver.domain']}")


def member_of(bridge: BridgeContext, mxid: str) -> int | None:
    """The member id a ghost's MXID stands for; None for any other MXID."""
    prefix, suffix = bridge.matrix.user_id_prefix, bridge.matrix.user_id_suffix
    if not (mxid.startswith(prefix) and mxid.endswith(suffix)):
        return None
    middle = mxid[len(prefix) : len(mxid) - len(suffix)]
    if not middle.isdigit():
        return None
    member_id = int(middle)
    return member_id if mxid_of(bridge, member_id) == mxid else None
