"""Catching up on Matrix messages Synapse never sent to the bridge.

Synapse moves an appservice's stream position past events once they are in its in-memory
sending queue; if it dies before they are in a stored transaction (kill -9, a crash, an OOM),
they are never sent. Synapse on SQLite also numbers transactions from 1 again after a restart.
So when the bridge has reason to think Synapse went away (one of its requests could not reach
Synapse, or transaction ids went backwards), the next transaction first walks each portal's
timeline back from the newest event to the newest message the bridge knows, and queues the
messages it never got, oldest first, ahead of the transaction's own events (the same handling,
so each event is still done once: events are known by id).

Only ``m.room.message`` events are caught up this way (not memberships or redactions), and
never the bridge's own (bot, ghosts) or commands.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.types import Event, EventID, EventType, RoomID, UserID

from .db import DedupeTable, MessageTable

if TYPE_CHECKING:
    from .bridge import KalandraBridge
    from .portal import Portal

log = logging.getLogger("kalandra.bridge.catch_up")

_PAGES = 10  # of 100 events per portal, at most
_state: dict[str, Any] = {"suspect": False, "last_txn": None}


def homeserver_unreachable() -> None:
    """A request to the homeserver failed to connect or was cut: it may have restarted."""
    _state["suspect"] = True


def due(txn_id: str) -> bool:
    """Whether the transaction ``txn_id`` should catch up first (and forget the reason)."""
    number = int(txn_id) if txn_id.isdigit() else None
    last = _state["last_txn"]
    restarted = number is not None and last is not None and number < last
    if number is not None:
        _state["last_txn"] = number
    suspect, _state["suspect"] = _state["suspect"], False
    return bool(suspect or restarted)


async def missed(
    bridge: KalandraBridge, portal: Portal, known: Callable[[EventID], bool]
) -> list[dict[str, Any]]:
    """The portal's messages from Matrix users the bridge has not handled, oldest first."""
    room = portal.row.mxid
    if room is None:
        return []
    prefix = str(bridge.config["bridge.command_prefix"])
    dedupe, messages = DedupeTable(bridge.db), MessageTable(bridge.db)
    path = Path.v3.rooms[room].messages
    query = {"dir": "b", "limit": "100"}
    found: list[dict[str, Any]] = []
    for _ in range(_PAGES):
        page = await bridge.az.intent.api.request(Method.GET, path, query_params=query)
        for raw in page.get("chunk", []):
            if raw.get("type") != str(EventType.ROOM_MESSAGE) or "state_key" in raw:
                continue
            sender = UserID(raw.get("sender", ""))
            if sender == bridge.az.bot_mxid or bridge.is_bridge_ghost(sender):
                continue
            event_id = EventID(raw["event_id"])
            if (
                known(event_id)
                or await dedupe.event_seen(event_id)
                or await messages.index_for(RoomID(room), event_id) is not None
            ):
                return found[::-1]
            body = raw.get("content", {}).get("body")
            if isinstance(body, str) and body.startswith(prefix):
                continue  # a command: answered once or never, not replayed
            raw.setdefault("room_id", room)
            found.append(raw)
        if not page.get("chunk") or not page.get("end"):
            break
        query["from"] = page["end"]
    return found[::-1]


async def catch_up(
    bridge: KalandraBridge,
    portals: list[Portal],
    known: Callable[[EventID], bool],
    handle: Callable[[Event], Awaitable[None]],
) -> None:
    """Hand each portal's missed messages to ``handle`` (the transaction's event handler)."""
    for portal in portals:
        try:
            events = await missed(bridge, portal, known)
        except Exception as exc:  # the transaction goes on; the next suspicion tries again
            log.warning("portal %s: catching up failed (%s)", portal.hex, type(exc).__name__)
            homeserver_unreachable()
            continue
        if events:
            log.info("portal %s: %d missed Matrix messages caught up", portal.hex, len(events))
        for raw in events:
            await handle(Event.deserialize(raw))
