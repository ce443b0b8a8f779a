"""The work a portal's queue toward Kalandra does: one item per Matrix event, in its place.

Every Matrix event of a portal gets its place (:class:`EventSlot`) when its appservice
transaction is dispatched, before mautrix's handler runs; the handler fills it with the work
(:class:`FromMatrix`, or nothing). Data only: the queue is portal/to_kalandra.py's, and the
Matrix side (appservice/handler.py, encryption/e2ee.py, appservice/transactions.py) hands work in
through these types without importing the portal."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass

from mautrix.types import ContentURI, EventID, MessageEventContent, UserID

from kalandra_core.client.room_meta import RoomMeta


@dataclass(frozen=True, slots=True)
class MatrixAvatar:
    """An m.room.avatar set in Matrix: its image is fetched in the portal's queue."""

    url: ContentURI
    mimetype: str | None


@dataclass(frozen=True, slots=True)
class FromMatrix:
    """One Matrix event's work toward Kalandra. ``kind``: "message", "join", "invite" (of
    ``target`` by ``sender``: access.py), "leave" (a
    bridged user left, or was kicked or banned), "kick"/"ban"/"unban" (of a native member's
    ghost: ``member_id``), "redact" (``redacts``), "reaction" (``key`` on ``relates_to``),
    "undecryptable" (an encrypted event that fails, ``reason`` saying why), "unencrypted" (a
    message sent in clear where encryption is required: refused)."""

    kind: str
    sender: UserID
    event_id: EventID
    permission: str = "none"
    content: MessageEventContent | None = None
    target: UserID | None = None
    member_id: int | None = None
    redacts: EventID | None = None
    reason: str = ""
    relates_to: EventID | None = None
    key: str = ""
    meta: RoomMeta | MatrixAvatar | None = None  # "meta": portal/room_metadata.py
    held: bool = False  # held before for its target's room key (e2ee.hold), handed on again


class EventSlot:
    """An event's place in its portal's queue: ``work`` is filled by the event's handler (None:
    nothing to do), ``done`` by the portal once the event is handled for good."""

    __slots__ = ("done", "event_id", "place", "work")

    def __init__(self, event_id: EventID, place: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.event_id = event_id
        self.place = place  # its number in the queue: places are given in queue order
        self.work: asyncio.Future[FromMatrix | None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.done.add_done_callback(_retrieve)

    def fill(self, work: FromMatrix | None) -> None:
        if not self.work.done():
            self.work.set_result(work)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # read (a transaction that gave up waiting may never look)


# The slot of the event being handled (set around mautrix's dispatch of each portal event; its
# handler tasks inherit it).
CURRENT_SLOT: ContextVar[EventSlot | None] = ContextVar("kalandra_event_slot", default=None)


def release_slot() -> None:
    """The event being handled has no work toward Kalandra (or its handler is over)."""
    slot = CURRENT_SLOT.get()
    if slot is not None:
        slot.fill(None)
