"""Read receipts and typing across the bridge.

Toward Matrix: a native member's Read receipt (a logged AppReceipt) moves its ghost's read
receipt to the Matrix event of that message; a Typing frame (ephemeral) sets the ghost typing
for the time it names, or stops it. Delivered receipts have no per-user Matrix counterpart and
only advance the queue.

Toward Matrix users' Kalandra members (appservice ephemeral events, MSC2409): a bridged user's
``m.read`` receipt becomes a Read receipt from their puppet leaf, for the message the event is
(or, for an event that is no bridged message, the newest bridged log index); receipts that
would not move the member's read position forward are not sent. ``m.typing`` changes become
Typing frames from the puppet leaves of the users who started or stopped. Only Matrix users who
are members already (they spoke in the room) are bridged: reading or typing never makes one.

Delivery receipts (``bridge.delivery_receipts``): the bot's read receipt on a Matrix message
once it is in the Kalandra log, and a Delivered receipt from the bot's member once native
messages are in Matrix, coalesced (a receipt covers the messages before it, so one for the
newest is enough; at most one in flight per portal).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from mautrix.client import ClientAPI
from mautrix.errors import MForbidden
from mautrix.types import EventID, RoomID, UserID

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.extras import receipt_frame, send_receipt, typing_frame
from kalandra_core.proto import ReceiptKind

from ..db import BridgedUserTable, MessageTable
from .relations import matrix_event, send_logged

if TYPE_CHECKING:
    from ..context import BridgeContext, BridgedMember, PortalFace

log = logging.getLogger("kalandra.bridge.ephemeral")

_READ = "Read"
# Matrix says when a user stops typing (or Synapse's timeout does): a long hold is safe.
_MATRIX_TYPING_MS = 120_000


# --- Kalandra -> Matrix ---------------------------------------------------------------------


def _from_matrix(bridge: BridgeContext, member_id: int) -> bool:
    return member_id == bridge.bot.member_id or member_id in bridge.bridged_users.member_ids


async def receipt_to_matrix(portal: PortalFace, item: ev.Receipted) -> None:
    bridge = portal.bridge
    if item.kind == _READ and not _from_matrix(bridge, item.sender_id):
        target = await matrix_event(portal, item.target)
        if target is not None:
            intent = await portal.ghost_intent(item.sender_id)
            try:
                await ClientAPI.send_receipt(intent, portal.room_mxid, target)
            except MForbidden:
                # The event is from before the ghost's Matrix join, which history visibility
                # `invited` hides from it (access.py): no receipt, and the queue goes on.
                log.info("portal %s: a receipt on an event its ghost cannot see", portal.hex)
    await portal.advance(item.log_index, None)


async def typing_to_matrix(portal: PortalFace, item: ev.Typing) -> None:
    if _from_matrix(portal.bridge, item.sender_id):
        return
    intent = await portal.ghost_intent(item.sender_id)
    await ClientAPI.set_typing(intent, portal.room_mxid, item.timeout_ms if item.typing else 0)


# --- Matrix -> Kalandra ---------------------------------------------------------------------


class MatrixEphemeral:
    """Per-process memory of what was sent: each bridged user's read position per room, and
    who is typing in each portal (Matrix sends the whole typing list at every change)."""

    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self._read: dict[tuple[bytes, UserID], int] = {}
        self._typing: dict[RoomID, set[UserID]] = {}
        self._locks: dict[tuple[bytes, UserID], asyncio.Lock] = {}
        self._strangers: set[UserID] = set()  # Matrix users with no Kalandra member

    async def _member(self, portal: PortalFace, mxid: UserID) -> BridgedMember | None:
        """The user's puppet leaf if it is in the portal's group now."""
        if mxid == self.bridge.az.bot_mxid or self.bridge.is_bridge_ghost(mxid):
            return None
        if self.bridge.config.permission_level(mxid) not in ("user", "admin"):
            return None  # demoted: nothing goes out as their member any more (permissions.py)
        if self.bridge.bot.client is None:
            return None  # not started yet
        room = self.bridge.bot.core.rooms.get(portal.room_id)
        if room is None or not room.active:
            return None
        user = self.bridge.bridged_users.find(mxid)
        if user is None and mxid in self._strangers:
            return None
        if user is None:  # not loaded since the start: a member made by an earlier run?
            key = self.bridge.config.mls_state_key
            assert key is not None
            row = await BridgedUserTable(self.bridge.db, key).get(mxid)
            if row is None or row.member_id is None:
                self._strangers.add(mxid)  # until they speak (then by_mxid has them)
                return None
            user = await self.bridge.bridged_users.get(mxid, row.permission)
        return user if user.member_id in room.roster() else None

    async def read(self, portal: PortalFace, mxid: UserID, event_id: EventID) -> None:
        user = await self._member(portal, mxid)
        if user is None or portal.mxid is None:
            return
        table = MessageTable(self.bridge.db)
        found = await table.index_for(portal.mxid, event_id)
        if found is not None and found[0] == portal.room_id:
            target: int | None = found[1]
        else:
            target = await _newest_bridged(self.bridge, portal.room_id)
        if target is None:
            return
        key = (portal.room_id, mxid)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if target <= self._read.get(key, -1):
                return  # not forward: Matrix clients re-send receipts for older events

            def build(core: ClientCore, room_int: int, epoch: int) -> tuple[int, bytes]:
                return receipt_frame(
                    core, room_int=room_int, epoch=epoch, target=target, now=time.time()
                )

            try:
                await send_logged(portal.bridge, user, portal.room_id, build)
            except Exception as exc:  # a receipt is not worth a retry loop
                log.info("portal %s: read receipt not bridged (%s)", portal.hex, exc)
                return
            self._read[key] = target

    async def typing(self, portal: PortalFace, typing: list[UserID]) -> None:
        assert portal.mxid is not None
        now = set(typing)
        before = self._typing.get(portal.mxid, set())
        self._typing[portal.mxid] = now
        changes = [(m, True) for m in now - before] + [(m, False) for m in before - now]
        for mxid, state in changes:
            user = await self._member(portal, mxid)
            if user is not None:
                await self._send_typing(user, portal, state)

    async def _send_typing(self, user: BridgedMember, portal: PortalFace, typing: bool) -> None:
        room = self.bridge.bot.core.rooms.get(portal.room_id)
        if room is None:
            return
        try:
            await user.connect()
            _, data = typing_frame(
                user.core,
                room_int=room.room_int,
                epoch=room.epoch,
                typing=typing,
                timeout_ms=_MATRIX_TYPING_MS,
                now=time.time(),
            )
            user.send_unanswered(data)  # ephemeral: nothing answers it
        except Exception as exc:
            log.info("portal %s: typing not bridged (%s)", portal.hex, type(exc).__name__)


async def _newest_bridged(bridge: BridgeContext, room_id: bytes) -> int | None:
    value = await bridge.db.fetchval(
        "SELECT MAX(log_index) FROM bridge_messages WHERE room_id = $1", room_id
    )
    return None if value is None else int(value)


# --- delivery receipts ----------------------------------------------------------------------


async def delivered_to_kalandra(bridge: BridgeContext, room: RoomID, event_id: EventID) -> None:
    """The bot's read receipt on a Matrix message now in the Kalandra log (best effort)."""
    try:
        await ClientAPI.send_receipt(bridge.az.intent, room, event_id)
    except Exception as exc:
        log.info("delivery receipt not sent to Matrix (%s)", type(exc).__name__)


class KalandraDelivery:
    """Delivered receipts from the bot's member for native messages now in Matrix."""

    def __init__(self, portal: PortalFace) -> None:
        self.portal = portal
        self.newest = -1
        self.sent = -1
        self._task: asyncio.Task[None] | None = None

    def delivered(self, log_index: int) -> None:
        self.newest = max(self.newest, log_index)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"delivery-{self.portal.hex}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        client = self.portal.bridge.bot.client
        while client is not None and self.sent < self.newest:
            target = self.newest
            try:
                await send_receipt(client, self.portal.room_id, target, ReceiptKind.DELIVERED)
            except Exception as exc:  # the next delivered message tries again
                log.info("portal %s: delivery receipt not sent (%s)", self.portal.hex, exc)
                return
            self.sent = target
