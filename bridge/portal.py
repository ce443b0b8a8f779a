"""Portals: a Kalandra room and its Matrix room, and the ordered queue toward Matrix.

Toward Matrix the room's Kalandra log is the queue: the bot's client applies the log in order
and hands each decrypted message to its portal; the portal sends it from the sender's ghost
with the transaction id ``kalandra-<room hex>-<log index>`` (Synapse answers a repeat with the
first event), records (room, log index) <-> event id and advances ``last_log_index`` in one
transaction, and only then counts the message as done (which lets the bot's room state be
saved past it, see bot_state.py). After a restart the client resyncs from its saved state and
the portal skips what ``last_log_index`` says is bridged. A failed send is retried, in place, so
the order holds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mautrix.errors import MNotFound
from mautrix.types import (
    EventID,
    EventType,
    Format,
    MessageEventContent,
    MessageType,
    RoomAlias,
    RoomID,
    TextMessageEventContent,
    UserID,
)

from kalandra_core.client.content import Content
from kalandra_core.client.events import Message

from .bridged_user import BridgedUser
from .db import DedupeTable, MessageTable, PortalRow, PortalTable
from .puppet import Puppet

if TYPE_CHECKING:
    from .bridge import KalandraBridge

log = logging.getLogger("kalandra.bridge.portal")

PROTOCOL: dict[str, Any] = {"id": "kalandra", "displayname": "Kalandra"}
_KINDS = {"text": MessageType.TEXT, "notice": MessageType.NOTICE, "emote": MessageType.EMOTE}
_MX_KINDS = {v: k for k, v in _KINDS.items()}
_RETRY_MAX = 30.0


def matrix_content(content: Content) -> TextMessageEventContent:
    """A Kalandra message body as m.room.message content (HTML carried when present)."""
    out = TextMessageEventContent(msgtype=_KINDS.get(content.kind, MessageType.TEXT))
    out.body = content.body
    if content.formatted_body is not None:
        out.format = Format.HTML
        out.formatted_body = content.formatted_body
    return out


def kalandra_content(content: MessageEventContent) -> Content | None:
    """m.room.message text/notice/emote as a Kalandra body (HTML carried); None otherwise."""
    if not isinstance(content, TextMessageEventContent):
        return None
    kind = _MX_KINDS.get(content.msgtype)
    if kind is None:
        return None
    html = content.formatted_body if content.format == Format.HTML else None
    return Content(body=content.body or "", kind=kind, formatted_body=html or None)


@dataclass(frozen=True, slots=True)
class _FromMatrix:
    sender: UserID
    permission: str
    content: Content | None  # None: the user joined (added to the Kalandra room)
    event_id: EventID


class Portal:
    by_room: ClassVar[dict[bytes, Portal]] = {}

    def __init__(self, bridge: KalandraBridge, row: PortalRow) -> None:
        self.bridge = bridge
        self.row = row
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.room_ready = asyncio.Event()
        if row.mxid is not None:
            self.room_ready.set()
        self._create_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.outgoing: asyncio.Queue[_FromMatrix] = asyncio.Queue()
        self._out_task: asyncio.Task[None] | None = None

    # --- identity ------------------------------------------------------------------------------

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
    def alias(self) -> RoomAlias:
        config = self.bridge.config
        local = config["bridge.alias_template"].format(roomid=self.hex)
        return RoomAlias(f"#{local}:{config['homeserver.domain']}")

    # --- loading and creating --------------------------------------------------------------------

    @classmethod
    async def load_all(cls, bridge: KalandraBridge) -> list[Portal]:
        for row in await PortalTable(bridge.db).all():
            if row.room_id not in cls.by_room:
                cls.by_room[row.room_id] = cls(bridge, row)
        return list(cls.by_room.values())

    @classmethod
    async def get_or_create(
        cls, bridge: KalandraBridge, room_id: bytes, *, name: str, topic: str, last_log_index: int
    ) -> Portal:
        """The portal of a room the bot is in; a new one starts bridging after
        ``last_log_index`` (what the bot has applied already is history, not new messages)."""
        portal = cls.by_room.get(room_id)
        if portal is not None:
            return portal
        row = PortalRow(
            room_id=room_id,
            mxid=None,
            encrypted=False,  # end-to-bridge encryption of portals comes with a later slice
            name=name,
            topic=topic,
            last_log_index=last_log_index,
        )
        table = PortalTable(bridge.db)
        await table.insert(row)
        stored = await table.get(room_id)
        assert stored is not None
        portal = cls.by_room.setdefault(room_id, cls(bridge, stored))
        portal.start()
        return portal

    @classmethod
    def by_mxid(cls, mxid: RoomID) -> Portal | None:
        return next((p for p in cls.by_room.values() if p.mxid == mxid), None)

    def _bridge_info(self) -> dict[str, Any]:
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
                    invite = []
                await PortalTable(self.bridge.db).set_mxid(self.room_id, mxid)
                self.row.mxid = mxid
                self.room_ready.set()
            for user in invite:
                try:
                    await intent.invite_user(mxid, user)
                except Exception as exc:  # already in the room, or invited
                    log.debug("invite to %s not sent: %s", mxid, type(exc).__name__)
            return mxid

    async def _create(self, invite: list[UserID]) -> RoomID:
        info = self._bridge_info()
        state_key = f"org.kalandra.bridge://kalandra/{self.hex}"
        # No power level override: the creator (the bot) gets 100 in room versions up to 11,
        # and outranks every power level in 12+ (where listing it in "users" is refused).
        return await self.bridge.az.intent.create_room(
            alias_localpart=self.alias[1:].split(":", 1)[0],
            name=self.row.name or None,
            topic=self.row.topic or None,
            invitees=invite,
            initial_state=[
                {"type": t, "state_key": state_key, "content": info}
                for t in ("m.bridge", "uk.half-shot.bridge")
            ],
        )

    # --- the queue toward Matrix ---------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"portal-{self.hex}")
        if self._out_task is None:
            self._out_task = asyncio.create_task(self._run_out(), name=f"portal-out-{self.hex}")

    async def stop(self) -> None:
        for task in (self._task, self._out_task):
            if task is not None:
                task.cancel()
        self._task = self._out_task = None

    def enqueue(self, message: Message) -> None:
        self.queue.put_nowait(message)

    async def _run(self) -> None:
        await self.room_ready.wait()
        await self.bridge.matrix_ready.wait()
        while True:
            message = await self.queue.get()
            delay = 0.5
            while True:
                try:
                    await self._to_matrix(message)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "portal %s: log index %d not bridged yet (%s); retrying",
                        self.hex,
                        message.log_index,
                        type(exc).__name__,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
            self.bridge.bot.state.message_done(self.room_id)

    async def _to_matrix(self, message: Message) -> None:
        if message.log_index <= self.row.last_log_index:
            return  # bridged before a restart
        if message.sender_id == self.bridge.bot.member_id:
            return  # the bot's own (relayed) messages came from Matrix
        if message.sender_id in BridgedUser.member_ids:
            return  # a bridged Matrix user's message: it came from Matrix (no echo)
        mxid = self.row.mxid
        assert mxid is not None
        puppet = await Puppet.get(self.bridge, message.sender_id)
        await puppet.ensure_ready()
        await puppet.intent.ensure_joined(mxid)
        event_id = await puppet.intent.send_message_event(
            mxid,
            EventType.ROOM_MESSAGE,
            matrix_content(message.content),
            txn_id=f"kalandra-{self.hex}-{message.log_index}",
        )
        await MessageTable(self.bridge.db).record_to_matrix(
            self.room_id, message.log_index, mxid, event_id
        )
        self.row.last_log_index = message.log_index
        self.row.last_event_id = event_id

    # --- the queue toward Kalandra ----------------------------------------------------------

    def from_matrix(
        self, sender: UserID, permission: str, content: MessageEventContent, event_id: EventID
    ) -> bool:
        """Queue a Matrix message (in arrival order); False if it is not a bridged kind."""
        body = kalandra_content(content)
        if body is None:
            return False
        self.outgoing.put_nowait(_FromMatrix(sender, permission, body, event_id))
        return True

    def member_joined(self, user: UserID, permission: str, event_id: EventID) -> None:
        """A bridged user joined the Matrix room: added to the Kalandra room, in order."""
        self.outgoing.put_nowait(_FromMatrix(user, permission, None, event_id))

    async def _run_out(self) -> None:
        while True:
            item = await self.outgoing.get()
            try:
                await self._to_kalandra(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "portal %s: a Matrix message was not bridged (%s)",
                    self.hex,
                    type(exc).__name__,
                )
                await self._notice_failure(item, exc)

    async def _to_kalandra(self, item: _FromMatrix) -> None:
        mxid = self.row.mxid
        assert mxid is not None
        user = await BridgedUser.get(self.bridge, item.sender, item.permission)
        if item.content is None:
            await user.ensure_in_room(self.room_id)
            return
        if await DedupeTable(self.bridge.db).event_seen(item.event_id):
            return  # bridged before (a replayed transaction)
        index = await user.send(self.room_id, item.content)
        await MessageTable(self.bridge.db).record_to_kalandra(
            self.room_id, index, mxid, item.event_id
        )

    async def _notice_failure(self, item: _FromMatrix, exc: Exception) -> None:
        mxid = self.row.mxid
        if mxid is None:
            return
        try:
            await self.bridge.az.intent.send_notice(
                mxid, f"Your message could not be bridged to Kalandra ({type(exc).__name__})."
            )
        except Exception as notice_exc:
            log.warning("portal %s: notice not sent (%s)", self.hex, type(notice_exc).__name__)
