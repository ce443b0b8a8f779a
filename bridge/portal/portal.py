"""Portals: a Kalandra room and its Matrix room.

This module loads and creates portals and their Matrix rooms; each direction's queue lives in
its own module (to_matrix.py, to_kalandra.py), joined here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from mautrix.errors import MNotFound
from mautrix.types import EventType, RoomID, UserID

from .. import access
from ..db import PortalRow, PortalTable
from ..encryption import e2ee
from ..routed import MatrixInvite
from . import room_metadata
from .base import PROTOCOL
from .members import invited_by_bot
from .to_kalandra import PortalToKalandra, kalandra_content
from .to_matrix import PortalToMatrix, matrix_content

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalDirectory, PortalFace

log = logging.getLogger("kalandra.bridge.portal")
T = TypeVar("T")

BRIDGE_STATE_TYPES = (
    EventType.find("m.bridge", EventType.Class.STATE),
    EventType.find("uk.half-shot.bridge", EventType.Class.STATE),
)

__all__ = ["Portal", "Portals", "kalandra_content", "matrix_content"]


class Portals:
    """The bridge's portals, by Kalandra room: one directory per bridge process (app.py)."""

    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self._by_room: dict[bytes, Portal] = {}
        # Found before: every event of every portal is looked up, several times (a portal's
        # Matrix room is set once made, and a forgotten portal is checked for).
        self._by_mxid: dict[RoomID, Portal] = {}

    def get(self, room_id: bytes) -> Portal | None:
        return self._by_room.get(room_id)

    def by_mxid(self, mxid: RoomID) -> Portal | None:
        portal = self._by_mxid.get(mxid)
        if (
            portal is not None
            and portal.mxid == mxid
            and self._by_room.get(portal.room_id) is portal
        ):
            return portal
        self._by_mxid.pop(mxid, None)
        portal = next((p for p in self._by_room.values() if p.mxid == mxid), None)
        if portal is not None:
            self._by_mxid[mxid] = portal
        return portal

    def all(self) -> list[Portal]:
        return list(self._by_room.values())

    def forget(self, portal: PortalFace) -> None:
        """``portal`` is no longer bridged (unbridge)."""
        if self._by_room.get(portal.room_id) is portal:
            del self._by_room[portal.room_id]

    async def load_all(self) -> list[Portal]:
        for row in await PortalTable(self.bridge.db).all():
            if row.room_id not in self._by_room:
                self._by_room[row.room_id] = Portal(self.bridge, row)
        return self.all()

    async def get_or_create(
        self, room_id: bytes, *, name: str, topic: str, last_log_index: int
    ) -> Portal:
        """The portal of a room the bot is in; a new one starts bridging after
        ``last_log_index`` (what the bot has applied already is history, not new messages)."""
        portal = self._by_room.get(room_id)
        if portal is not None:
            return portal
        bridge = self.bridge
        name, topic = room_metadata.current(bridge, room_id, name, topic)
        row = PortalRow(
            room_id=room_id,
            mxid=None,
            encrypted=e2ee.encrypt_new_portals(bridge),
            name=name,
            topic=topic,
            last_log_index=last_log_index,
        )
        table = PortalTable(bridge.db)
        await table.insert(row)
        stored = await table.get(room_id)
        assert stored is not None
        portal = self._by_room.setdefault(room_id, Portal(bridge, stored))
        portal.start()
        return portal

    async def open(self, room_id: bytes) -> Portal:
        """The portal of a room the bot is in, made if needed (from the room's current name
        and topic; what the bot applied already is history)."""
        bridge = self.bridge
        room = bridge.bot.core.rooms[room_id]
        assert bridge.kalandra is not None
        state = await bridge.kalandra.store.load_room(room_id)
        name, topic = ("", "") if state is None else (state.room.name, state.room.topic)
        return await self.get_or_create(
            room_id, name=name, topic=topic, last_log_index=room.last_seen
        )

    async def bridge_existing(
        self,
        room_id: bytes,
        mxid: RoomID,
        *,
        name: str,
        topic: str,
        last_log_index: int,
    ) -> Portal:
        """Make an existing Matrix room the portal of a room the bot is in (neither bridged
        yet, checked by the caller): the bridge state first (it fails without the power to
        send state, and then nothing is stored), then the row."""
        bridge = self.bridge
        row = PortalRow(
            room_id=room_id,
            mxid=mxid,
            encrypted=await e2ee.room_is_encrypted(bridge, mxid),
            name=name,
            topic=topic,
            last_log_index=last_log_index,
        )
        portal = Portal(bridge, row)
        intent = bridge.az.intent
        for event_type in BRIDGE_STATE_TYPES:
            await intent.send_state_event(
                mxid, event_type, portal.bridge_info(), state_key=portal.bridge_state_key
            )
        table = PortalTable(bridge.db)
        await table.delete(room_id)  # a row left without a Matrix room (create half-way)
        await table.insert(row)
        stored = await table.get(room_id)
        assert stored is not None
        portal.row = stored
        self._by_room[room_id] = portal
        portal.start()
        try:  # the alias names the portal's room; the appservice owns its namespace
            await intent.add_room_alias(mxid, portal.alias_localpart, override=True)
        except Exception as exc:
            log.warning("portal %s: alias not set (%s)", portal.hex, type(exc).__name__)
        await access.enforce_room_rules(bridge, mxid)
        # The admin let this room's present members in (a grant each; joins from now on
        # are checked like any portal's).
        members = await _quietly(portal, "member list", intent.get_joined_members(mxid))
        for user in members or {}:
            ours = user == intent.mxid or bridge.is_bridge_ghost(user)
            if not ours and access.level_of(bridge, user) != "none":
                await access.grant(bridge, room_id, user, "admin:bridge")
        return portal


class Portal(PortalToMatrix, PortalToKalandra):
    def __init__(self, bridge: BridgeContext, row: PortalRow) -> None:
        super().__init__(bridge, row)
        self._create_lock = asyncio.Lock()

    async def let_in(self, user: UserID, *, with_history: bool) -> None:
        """Invite ``user`` into the portal (made if needed), who may enter (access.py).
        ``with_history``: invited with the room's creation, before its kept history is sent
        (for members of the room and admins); else at the end of the portal's queue, so that
        the newcomer reads from the invitation on (history visibility ``invited``)."""
        if with_history:
            await self.ensure_matrix_room(invite=[user])
            return
        await self.ensure_matrix_room(invite=[])
        self.bridge.bot.route(MatrixInvite(self.room_id, user))

    def bridge_info(self) -> dict[str, Any]:
        bot = self.bridge.az.bot_mxid
        return {
            "bridgebot": bot,
            "creator": bot,
            "protocol": PROTOCOL,
            "channel": {"id": self.hex, "displayname": self.row.name or self.hex},
        }

    async def ensure_matrix_room(self, invite: list[UserID]) -> RoomID:
        """Create the Matrix room (or find it by its alias, after a crash half-way) and invite
        ``invite``; idempotent."""
        async with self._create_lock:
            intent = self.bridge.az.intent
            mxid = self.row.mxid
            if mxid is None:
                try:
                    mxid = (await intent.resolve_room_alias(self.alias)).room_id
                except MNotFound:
                    mxid = await self._create(invite)
                    await self._grant_admins(mxid, invite)
                    invite = []
                await PortalTable(self.bridge.db).set_mxid(self.room_id, mxid)
                self.row.mxid = mxid
                self.room_ready.set()
            for user in invite:
                try:
                    await intent.invite_user(mxid, user)
                except Exception as exc:  # already in the room, or invited
                    log.debug("invite to %s not sent: %s", mxid, type(exc).__name__)
                else:
                    await invited_by_bot(self.bridge, mxid)
            await self._grant_admins(mxid, invite)
            return mxid

    async def _grant_admins(self, mxid: RoomID, users: list[UserID]) -> None:
        """Bridge admins among ``users`` get power level 100 in the portal, so they can moderate
        it from their Matrix client (kicks and bans of ghosts become Kalandra moderation). Added
        to the room's current levels: replacing ``users`` at creation would drop the creator's
        own 100 in room versions up to 11."""
        admins = [u for u in users if self.bridge.config.permission_level(u) == "admin"]
        if not admins:
            return
        intent = self.bridge.az.intent
        try:
            levels = await intent.get_power_levels(mxid, ignore_cache=True)
            if all(levels.get_user_level(u) >= 100 for u in admins):
                return
            for user in admins:
                levels.set_user_level(user, 100)
            await intent.set_power_levels(mxid, levels)
        except Exception as exc:  # the room works without it; moderation from Matrix does not
            log.warning("portal %s: admins not given power (%s)", self.hex, type(exc).__name__)

    @property
    def bridge_state_key(self) -> str:
        return f"org.kalandra.bridge://kalandra/{self.hex}"

    async def _create(self, invite: list[UserID]) -> RoomID:
        info = self.bridge_info()
        initial_state = [
            {"type": t.t, "state_key": self.bridge_state_key, "content": info}
            for t in BRIDGE_STATE_TYPES
        ]
        initial_state += access.initial_state()  # invite only; no history before one's invite
        encryption = e2ee.encryption_event(self.bridge) if self.row.encrypted else None
        if encryption is not None:
            initial_state.append({"type": "m.room.encryption", "content": encryption.serialize()})
        avatar = await room_metadata.initial_avatar(self.face)  # (changed before the portal)
        if avatar is not None:
            initial_state.append({"type": "m.room.avatar", "content": avatar})
        # No power level override: the creator (the bot) gets 100 in room versions up to 11,
        # and outranks every power level in 12+ (where listing it in "users" is refused).
        mxid = await self.bridge.az.intent.create_room(
            alias_localpart=self.alias_localpart,
            name=self.row.name or None,
            topic=self.row.topic or None,
            invitees=invite,
            initial_state=initial_state,
        )
        if encryption is not None:  # known before its event comes back in a transaction
            await self.bridge.az.state_store.set_encryption_info(mxid, encryption)
        return mxid

    @property
    def alias_localpart(self) -> str:
        return self.alias[1:].split(":", 1)[0]

    # --- bridging an existing Matrix room, and unbridging ------------------------------------

    async def unbridge(self) -> None:
        """Disconnect: nothing more crosses, the row and message map are forgotten (the room
        can be bridged again), the bridge state, alias, ghosts and bot leave the Matrix room.
        The Kalandra room stays, with the bot in it."""
        self.bridge.portals.forget(self)
        await self.stop()
        self.bridge.bot.state.room_released(self.room_id)
        await PortalTable(self.bridge.db).delete(self.room_id)
        mxid = self.row.mxid
        if mxid is None:
            return
        intent = self.bridge.az.intent
        for event_type in BRIDGE_STATE_TYPES:
            await _quietly(
                self,
                f"bridge state {event_type.t}",
                intent.send_state_event(mxid, event_type, {}, state_key=self.bridge_state_key),
            )
        await _quietly(self, "alias", intent.remove_room_alias(self.alias_localpart))
        members = await _quietly(self, "member list", intent.get_joined_members(mxid))
        for user in members or {}:
            if self.bridge.is_bridge_ghost(user):
                await _quietly(self, "ghost leave", intent.user(user).leave_room(mxid))
        await intent.leave_room(mxid)

    async def set_relay(self, enabled: bool, mxid: UserID | None) -> None:
        await PortalTable(self.bridge.db).set_relay(self.room_id, enabled=enabled, mxid=mxid)
        self.row.relay_enabled = enabled
        self.row.relay_mxid = mxid

    # --- both queues ---------------------------------------------------------------------------

    def start(self) -> None:
        self._start_to_matrix()
        self._start_to_kalandra()

    async def stop(self) -> None:
        self._stop_to_matrix()
        self._stop_to_kalandra()

    def queue_depths(self) -> tuple[int, int]:
        return self.queue.qsize(), self.outgoing.qsize()


async def _quietly(portal: Portal, what: str, step: Awaitable[T]) -> T | None:
    """Best-effort Matrix cleanup: a failed step is logged, not raised."""
    try:
        return await step
    except Exception as exc:
        log.warning("portal %s: %s failed (%s)", portal.hex, what, type(exc).__name__)
        return None


if TYPE_CHECKING:

    def _implements_the_face(portal: Portal) -> PortalFace:
        return portal  # mypy: Portal has every member of PortalFace, with its types

    def _implements_the_directory(portals: Portals) -> PortalDirectory:
        return portals
