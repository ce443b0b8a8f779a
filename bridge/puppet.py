"""Ghosts: a native Kalandra member as ``@kalandra_<member id>:<domain>``.

A ghost is registered and named once (remembered in bridge_puppets), then joins portals through
its intent (mautrix invites it with the bot when needed). Its display name comes from
``bridge.displayname_template``, with the member's Kalandra account name as ``{displayname}``
(the member id when the account is unknown to this server). In a portal, the name the member's
own messages carry there replaces it (ghost_profile.py).
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

    def __init__(
        self, bridge: KalandraBridge, member_id: int, row: PuppetRow | None, name: str | None
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

    @classmethod
    async def get(cls, bridge: KalandraBridge, member_id: int) -> Puppet:
        puppet = cls.by_member.get(member_id)
        if puppet is None:
            row = await PuppetTable(bridge.db).get(member_id)
            name = None
            if bridge.kalandra is not None:
                account = await bridge.kalandra.store.get_member(member_id)
                name = None if account is None else account.name
            puppet = cls.by_member.setdefault(member_id, cls(bridge, member_id, row, name))
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


def mxid_of(bridge: KalandraBridge, member_id: int) -> UserID:
    """The ghost's MXID of a member (no lookup: the username template decides)."""
    config = bridge.config
    localpart = config["bridge.username_template"].format(userid=member_id)
    return UserID(f"@{localpart}:{config['homeserver.domain']}")


def member_of(bridge: KalandraBridge, mxid: str) -> int | None:
    """The member id a ghost's MXID stands for; None for any other MXID."""
    prefix, suffix = bridge.matrix.user_id_prefix, bridge.matrix.user_id_suffix
    if not (mxid.startswith(prefix) and mxid.endswith(suffix)):
        return None
    middle = mxid[len(prefix) : len(mxid) - len(suffix)]
    if not middle.isdigit():
        return None
    member_id = int(middle)
    return member_id if mxid_of(bridge, member_id) == mxid else None
