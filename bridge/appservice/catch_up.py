"""Catching up on Matrix events Synapse did not send to the bridge.

Synapse moves an appservice's stream position past events once they are in its in-memory
sending queue; if it dies before they are in a stored transaction (kill -9, a crash, an OOM),
they are never sent. Events it did store are sent again only when a new event wakes its
scheduler up ("not in recovery, not forcing retry" when the bridge comes back), and Synapse on
SQLite numbers transactions from 1 again after a restart. So the bridge does not wait for
Synapse: at start-up, whenever it saw the homeserver go away and come back (one of its requests
could not reach Synapse, the watch below lost it, or transaction ids went backwards), it walks
each portal's timeline back from the newest event to the newest event it has handled, and
queues what it never got, oldest first, through the same handler as a transaction's events (so
each event is done once: events are known by id, in the database).

Every kind the bridge handles is caught up (messages of every type, encrypted ones through the
decryption path, reactions, redactions, memberships, room metadata), except the bridge's own
events (bot, ghosts), invites of them, commands (answered once or never) and events redacted
since (a message taken back before the bridge saw it is not bridged). The walk stops at the
room's creation or the bot's join: what came before the portal is not the portal's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from mautrix.api import Method, Path
from mautrix.types import Event, EventID, EventType, RoomID, UserID

from ..db import DedupeTable, MessageTable

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.catch_up")

_PAGES = 10  # of 100 events per portal, at most
_WALKS = 8  # portals' timelines read at once
# Seconds between two checks that the homeserver answers: shorter than any restart of Synapse
# (its start-up alone takes seconds), so that no restart goes unseen; one cheap GET each.
_WATCH_EVERY = 1.0
_ANSWER_WITHIN = 10.0  # a busy homeserver is slow, not gone


def due(bridge: BridgeContext, txn_id: str) -> bool:
    """Whether the transaction ``txn_id`` should catch up first (and forget the reason)."""
    state = bridge.run_state.catch_up
    number = int(txn_id) if txn_id.isdigit() else None
    last = state.last_txn
    restarted = number is not None and last is not None and number < last
    if number is not None:
        state.last_txn = number
    suspect, state.suspect = state.suspect, False
    return suspect or restarted


def _ours(bridge: BridgeContext, user_id: str) -> bool:
    return user_id == bridge.az.bot_mxid or bridge.is_bridge_ghost(UserID(user_id))


def _before_portal(bridge: BridgeContext, raw: dict[str, Any]) -> bool:
    """The room's creation, or the bot's joining it: the portal's history starts after."""
    if raw.get("type") == str(EventType.ROOM_CREATE):
        return True
    if raw.get("type") != str(EventType.ROOM_MEMBER) or raw.get("state_key") != bridge.az.bot_mxid:
        return False
    prev = (raw.get("unsigned") or {}).get("prev_content") or {}
    return raw.get("content", {}).get("membership") == "join" and prev.get("membership") != "join"


def _wanted(bridge: BridgeContext, raw: dict[str, Any], prefix: str) -> bool:
    """Whether the bridge would act on ``raw`` (see the module's docstring)."""
    if _ours(bridge, raw.get("sender", "")):
        return False
    if "redacted_because" in (raw.get("unsigned") or {}):
        return False
    content = raw.get("content") or {}
    if raw.get("type") == str(EventType.ROOM_MEMBER):
        invited = content.get("membership") == "invite"
        return not (invited and _ours(bridge, raw.get("state_key", "")))
    body = content.get("body")
    return not (
        raw.get("type") == str(EventType.ROOM_MESSAGE)
        and isinstance(body, str)
        and body.startswith(prefix)
    )


async def missed(
    bridge: BridgeContext, portal: PortalFace, known: Callable[[EventID], bool]
) -> list[dict[str, Any]]:
    """The portal's events from Matrix users the bridge has not handled, oldest first."""
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
            if _before_portal(bridge, raw):
                return found[::-1]
            if not _wanted(bridge, raw, prefix):
                continue
            event_id = EventID(raw["event_id"])
            if (
                known(event_id)
                or await dedupe.event_seen(event_id)
                or await messages.index_for(RoomID(room), event_id) is not None
            ):
                return found[::-1]
            raw.setdefault("room_id", room)
            found.append(raw)
        if not page.get("chunk") or not page.get("end"):
            break
        query["from"] = page["end"]
    return found[::-1]


async def catch_up(
    bridge: BridgeContext,
    portals: Sequence[PortalFace],
    known: Callable[[EventID], bool],
    handle: Callable[[Event], Awaitable[None]],
) -> None:
    """Hand each portal's missed events to ``handle`` (the transaction's event handler).

    Transactions wait meanwhile (their events go after these), so the portals' timelines are
    read ``_WALKS`` at a time, not one after another; each portal's events are handed in
    order, once its walk is done (the order between portals does not matter)."""
    gate = asyncio.Semaphore(_WALKS)

    async def walk(portal: PortalFace) -> tuple[PortalFace, list[dict[str, Any]] | None]:
        async with gate:
            try:
                return portal, await missed(bridge, portal, known)
            except Exception as exc:  # the transaction goes on; the next suspicion tries again
                log.warning("portal %s: catching up failed (%s)", portal.hex, type(exc).__name__)
                bridge.run_state.catch_up.homeserver_unreachable()
                return portal, None

    walks = [asyncio.ensure_future(walk(portal)) for portal in portals]
    try:
        for next_done in asyncio.as_completed(walks):
            portal, events = await next_done
            if events:
                await _hand(portal, events, handle)
    finally:
        for pending in walks:
            pending.cancel()


async def _hand(
    portal: PortalFace, events: list[dict[str, Any]], handle: Callable[[Event], Awaitable[None]]
) -> None:
    log.info("portal %s: %d missed Matrix events caught up", portal.hex, len(events))
    for raw in events:
        try:
            event = Event.deserialize(raw)
        except Exception as exc:  # not one the bridge could read from Synapse either
            log.warning("portal %s: missed event skipped (%s)", portal.hex, type(exc).__name__)
            continue
        await handle(event)


async def _answers(probe: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with asyncio.timeout(_ANSWER_WITHIN), probe.get(url) as resp:
            await resp.read()
            return resp.status < 500
    except Exception:
        return False


def _probe_session(bridge: BridgeContext) -> aiohttp.ClientSession:
    """A connection of the watch's own: the bridge's pool may be full of requests waiting
    (every portal sending at once), and a wait for a free connection is no outage; taken for
    one, it would have every portal caught up, all transactions waiting meanwhile."""
    insecure = str(bridge.az.intent.api.base_url).startswith("https://") and not bool(
        bridge.config["homeserver.verify_ssl"]
    )
    connector = aiohttp.TCPConnector(limit=1, ssl=not insecure)
    return aiohttp.ClientSession(connector=connector)


async def watch(bridge: BridgeContext, run: Callable[[], Awaitable[None]]) -> None:
    """Catch up now (start-up), then each time the homeserver answers again after the bridge
    saw it unreachable: ``run`` catches every portal up."""
    async with _probe_session(bridge) as probe:
        await _watch(bridge, run, probe)


async def _watch(
    bridge: BridgeContext, run: Callable[[], Awaitable[None]], probe: aiohttp.ClientSession
) -> None:
    url = str(bridge.az.intent.api.base_url / "_matrix" / "client" / "versions")
    pending, lost = True, False
    while True:
        if not await _answers(probe, url):
            if not lost:
                log.warning("the homeserver does not answer: catching up once it is back")
            pending = lost = True
        elif pending or bridge.run_state.catch_up.suspect:
            bridge.run_state.catch_up.suspect = pending = lost = False
            try:
                await run()
            except Exception as exc:
                log.warning("catching up failed (%s): tried again", type(exc).__name__)
                pending = True
        await asyncio.sleep(1.0 if pending else _WATCH_EVERY)
