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

The walks run in the background, a few portals at a time (:class:`Rounds`): with a thousand
portals, a transaction waits only for the walks of the portals it has events for, each done
first, so live events are not held back by the others and each portal keeps Matrix order.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
_LOOKUPS = 4  # portals whose timelines are read at once in the background
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


class Rounds:
    """Catch-up rounds: each portal's timeline walked once per round, in the background,
    ``_LOOKUPS`` portals at a time, and first for a portal a transaction has an event for.

    A transaction does not wait for a thousand portals' walks: an event of a portal waits only
    for that portal's walk (:meth:`ensure`), which hands the portal's missed events over
    first, oldest first, so the portal's queue keeps Matrix order. One walk of a portal at a
    time (a new round's waits for the last round's)."""

    def __init__(
        self,
        bridge: BridgeContext,
        known: Callable[[EventID], bool],
        handle: Callable[[Event], Awaitable[None]],
    ) -> None:
        self._bridge = bridge
        self._known = known
        self._handle = handle
        self._due: dict[bytes, PortalFace] = {}  # this round's portals not walked yet
        self._walks: dict[bytes, asyncio.Future[None]] = {}  # this round's walks, started
        self._locks: dict[bytes, asyncio.Lock] = {}  # one walk per portal at a time
        self._walkers: set[asyncio.Task[None]] = set()
        self._started = 0.0

    def start(self, portals: Sequence[PortalFace]) -> None:
        """A new round, every portal due again; walked in the background from now on."""
        self._due = {portal.room_id: portal for portal in portals}
        self._walks = {}
        self._started = time.monotonic()
        for _ in range(_LOOKUPS - len(self._walkers)):
            walker = asyncio.ensure_future(self._walk_due())
            self._walkers.add(walker)
            walker.add_done_callback(self._walkers.discard)

    @property
    def walking(self) -> bool:
        return bool(self._due) or not all(walk.done() for walk in self._walks.values())

    async def ensure(self, portal: PortalFace) -> None:
        """Until the portal's walk of this round is over, its missed events handed over
        (started now if it is still due). A walk that failed said so, and the next round
        walks the portal again: its transaction's events go on meanwhile."""
        walk = self._walks.get(portal.room_id)
        if walk is None:
            if self._due.pop(portal.room_id, None) is None:
                return  # (not in this round: a portal made since)
            walk = self._walks[portal.room_id] = asyncio.ensure_future(self._walk(portal))
        await asyncio.shield(walk)

    def stop(self) -> None:
        self._due = {}
        for task in [*self._walkers, *self._walks.values()]:
            task.cancel()

    async def _walk_due(self) -> None:
        while self._due:
            await self.ensure(next(iter(self._due.values())))
        if len(self._walks) > _LOOKUPS and not self.walking:
            log.info(
                "%d portals' Matrix timelines caught up in %.1f s",
                len(self._walks),
                time.monotonic() - self._started,
            )

    async def _walk(self, portal: PortalFace) -> None:
        async with self._locks.setdefault(portal.room_id, asyncio.Lock()):
            try:
                events = await missed(self._bridge, portal, self._known)
                await _hand_over(portal, events, self._handle)
            except Exception as exc:  # a new round tries again (watch)
                log.warning("portal %s: catching up failed (%s)", portal.hex, type(exc).__name__)
                self._bridge.run_state.catch_up.homeserver_unreachable()


async def _hand_over(
    portal: PortalFace, events: list[dict[str, Any]], handle: Callable[[Event], Awaitable[None]]
) -> None:
    if events:
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
