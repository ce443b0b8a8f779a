"""What both directions of a portal share: the Kalandra room, its Matrix room, the row.

A portal is split by direction so that neither file grows into a catch-all: the queue toward
Matrix (to_matrix.py), the queue toward Kalandra (to_kalandra.py), and loading,
creating and the Matrix room itself (portal.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from mautrix.types import RoomAlias, RoomID

from ..db import PortalRow

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace

PROTOCOL: dict[str, Any] = {"id": "kalandra", "displayname": "Kalandra"}


class PortalBase:
    def __init__(self, bridge: BridgeContext, row: PortalRow) -> None:
        self.bridge = bridge
        self.row = row
        self.room_ready = asyncio.Event()
        if row.mxid is not None:
            self.room_ready.set()

    @property
    def face(self) -> PortalFace:
        """This portal as its features see it. The queues and members are parts of one class
        (Portal, portal.py, which implements PortalFace: mypy checks it there)."""
        return cast("PortalFace", self)

    @property
    def room_id(self) -> bytes:
        return self.row.room_id

    @property
    def hex(self) -> str:
        return self.row.room_id.hex()

    @property
    def mxid(self) -> RoomID | None:
        return self.row.mxid

    @property
    def room_mxid(self) -> RoomID:
        mxid = self.row.mxid
        assert mxid is not None, "the portal has no Matrix room yet"
        return mxid

    @property
    def alias(self) -> RoomAlias:
        config = self.bridge.config
        local = config["bridge.alias_template"].format(roomid=self.hex)
        return RoomAlias(f"#{local}:{config['homeserver.domain']}")
