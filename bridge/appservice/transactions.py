"""Appservice transactions are acknowledged to Synapse only when their portal events are done.

mautrix answers 200 to a transaction as soon as it has dispatched the events to background
tasks (even when a handler fails), and remembers transaction ids in memory only. Here
(docs/architecture.md, Exactly once):

- a transaction already in ``bridge_appservice_txns`` is answered at once, after a restart
  too. It is known by its id and its events' ids: Synapse on SQLite numbers transactions from 1
  again after each of its restarts, so an id alone would take new events for a replay (mautrix's
  own in-memory check by id is bypassed for the same reason);
- each event of a portal gets its place in the portal's queue at dispatch, in transaction
  order (portal/to_kalandra.py ``EventSlot``); the transaction waits until every place is done
  (sequenced in Kalandra and recorded, or recorded as failed with its status sent): portals
  proceed concurrently, each in order;
- only then is the transaction id recorded and 200 returned; if something could not even be
  recorded, Synapse gets a 500 (and retries the transaction; its events are recognised by id).

Commands and events outside portals keep mautrix's background handling: the transaction does
not wait for them (a long command must not hold back the room's events).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler
from mautrix.types import JSON, Event, EventID

from kalandra_core.storage.reachable import through_outage

from .. import health
from ..db import DedupeTable
from ..portal_work import CURRENT_SLOT, EventSlot
from . import catch_up
from .txn_order import TxnOrder

if TYPE_CHECKING:
    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.transactions")
_EMPTY = JSON({})
_FIRST_CATCH_UP = 60.0  # seconds a transaction waits at most for the start-up catch-up


@dataclass(slots=True)
class _Transaction:
    key: str = ""  # what bridge_appservice_txns records (see _txn_key)
    catching_up: bool = False  # a catch-up's events (each portal's walk first for the others)
    slots: list[EventSlot] = field(default_factory=list)
    failed: bool = False
    reason: str | None = None  # why it failed, when it is not the deliberate reordering refusal


_CURRENT: ContextVar[_Transaction | None] = ContextVar("kalandra_transaction", default=None)


class TransactionGate:
    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self.az = bridge.az
        self._handle_transaction = self.az.handle_transaction
        self._handle_matrix_event = self.az.handle_matrix_event
        # Events of a transaction still in progress when Synapse sent it again.
        self._in_flight: dict[EventID, EventSlot] = {}
        self._order: TxnOrder | None = None  # from the database at the first transaction
        # Transactions are given their places in portal queues one at a time, and a portal's
        # missed events (catch_up.py) before its events of any transaction: older first.
        self._dispatch = asyncio.Lock()
        self._rounds = catch_up.Rounds(bridge, self._in_flight.__contains__, self._caught_up)
        self._started = asyncio.Event()
        self._stopping = asyncio.Event()

    def install(self) -> None:
        self.az.handle_transaction = self.handle_transaction  # type: ignore[method-assign]
        self.az.handle_matrix_event = self.handle_matrix_event  # type: ignore[method-assign]
        self.az.app.middlewares.append(self._middleware)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "PUT" or "/transactions/" not in request.path:
            return await handler(request)
        txn_id = request.match_info.get("transaction_id", "")
        try:
            key = await _txn_key(request, txn_id)
        except web.HTTPRequestEntityTooLarge:  # a chunked body over max_body_size
            health.TRANSACTIONS.refuse(txn_id, "body over max_body_size")
            raise
        txn = _Transaction(key=key)
        self.az.transactions.discard(txn_id)  # the id alone is not the transaction
        token = _CURRENT.set(txn)
        try:
            response = await handler(request)
        finally:
            _CURRENT.reset(token)
        if txn.failed:
            # mautrix marked it seen in memory: forget that, Synapse will send it again.
            self.az.transactions.discard(txn_id)
            if txn.reason is not None:
                health.TRANSACTIONS.refuse(txn_id, txn.reason)
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "transaction not processed; retry"}, status=500
            )
        return response

    def stop(self) -> None:
        """At shutdown, before the listener stops: transactions in progress are given up (not
        acknowledged: Synapse sends them again). Their events wait on portal queues that stop
        too, and aiohttp would hold the process for a minute waiting for them."""
        self._stopping.set()

    async def handle_transaction(self, txn_id: str, **kwargs: Any) -> JSON:
        txn = _CURRENT.get()
        if txn is None:  # not through the HTTP route (nothing to answer): mautrix's way
            return await self._handle_transaction(txn_id, **kwargs)
        work = asyncio.ensure_future(self._handle(txn, txn_id, **kwargs))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([work, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        # An ordinary stop, not a fault: no error (the health state dies with the process).
        txn.failed = True
        log.info("transaction %s left for the homeserver to send again: stopping", txn_id)
        return _EMPTY

    async def _handle(self, txn: _Transaction, txn_id: str, **kwargs: Any) -> JSON:
        dedupe = DedupeTable(self.bridge.db)
        try:
            # An outage of the database is waited out here, not answered with a failure: Synapse
            # resends a failed transaction without its to-device events (room keys), which
            # would be lost.
            if self._order is None:
                last = await through_outage(dedupe.last_txn, "a transaction", log)
                self._order = TxnOrder(None if last is None else TxnOrder.number(last))
            seen = functools.partial(dedupe.txn_seen, txn.key or txn_id)
            if await through_outage(seen, "a transaction", log):
                health.TRANSACTIONS.acknowledged(txn_id)
                return _EMPTY
            if not self._order.admit(txn_id):
                log.warning(
                    "transaction %s arrived before %s: refused once, so that Synapse sends the"
                    " missing one first",
                    txn_id,
                    self._order.last and self._order.last + 1,
                )
                txn.failed = True
                return _EMPTY
            with contextlib.suppress(TimeoutError):  # never held for good by a slow start
                async with asyncio.timeout(_FIRST_CATCH_UP):
                    await self._started.wait()
            async with self._dispatch:
                if catch_up.due(self.bridge, txn_id):
                    # Synapse may have restarted: each portal's events it lost go first.
                    self._rounds.start(self.bridge.portals.all())
                output = await self._handle_transaction(txn_id, **kwargs)
            if txn.slots:
                # asyncio.wait, not gather: giving up (Synapse hung up) must not cancel them.
                await asyncio.wait([slot.done for slot in txn.slots])
                for slot in txn.slots:
                    if slot.done.cancelled() or slot.done.exception() is not None:
                        raise RuntimeError("an event of the transaction was not recorded")
            mark = functools.partial(dedupe.mark_txn, txn.key or txn_id)
            await through_outage(mark, "a transaction", log)
            self._order.acknowledged(txn_id)
            health.TRANSACTIONS.acknowledged(txn_id)
            return output
        except Exception as exc:
            log.warning("transaction %s not acknowledged (%s)", txn_id, type(exc).__name__)
            txn.failed = True
            txn.reason = f"not processed: {type(exc).__name__}"
            return _EMPTY

    async def catch_up(self) -> None:
        """Queue every portal's events Synapse did not send (catch_up.py), in the background:
        a transaction waits only for the walks of the portals it has events for. Each event
        is done once in its place."""
        async with self._dispatch:  # (between two transactions)
            self._rounds.start(self.bridge.portals.all())
        self._started.set()

    async def _caught_up(self, event: Event) -> None:
        """A missed event, handed over by its portal's walk (in a context of its own: the
        walk's events are awaited by nobody but the walk)."""
        token = _CURRENT.set(_Transaction(catching_up=True))
        try:
            await self.handle_matrix_event(event)
        finally:
            _CURRENT.reset(token)

    def stop_catching_up(self) -> None:
        self._rounds.stop()

    async def handle_matrix_event(self, event: Event, ephemeral: bool = False) -> None:
        txn = _CURRENT.get()
        event_id = getattr(event, "event_id", None)
        room_id = getattr(event, "room_id", None)
        portals = self.bridge.portals
        portal = None if txn is None or ephemeral or room_id is None else portals.by_mxid(room_id)
        if txn is None or portal is None or event_id is None:
            await self._handle_matrix_event(event, ephemeral)
            return
        if not txn.catching_up:
            await self._rounds.ensure(portal)  # the portal's missed events first
        slot = self._in_flight.get(event_id)
        if slot is not None:
            txn.slots.append(slot)  # already queued by an earlier attempt: wait for that one
            return
        slot = portal.reserve(event_id)
        self._in_flight[event_id] = slot
        slot.done.add_done_callback(lambda _: self._in_flight.pop(event_id, None))
        txn.slots.append(slot)
        token = CURRENT_SLOT.set(slot)
        try:
            # mautrix's handler tasks copy this context: they see the slot.
            await self._handle_matrix_event(event, ephemeral)
        except BaseException:
            slot.fill(None)
            raise
        finally:
            CURRENT_SLOT.reset(token)


async def _txn_key(request: web.Request, txn_id: str) -> str:
    """The transaction's id with a digest of its events' ids (of the whole body when it has no
    events): a retried transaction has the same events, a new one under a reused id does not.
    Only event ids count, since Synapse may rebuild the rest (ephemeral, to-device) on a retry."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        return txn_id
    events = body.get("events") if isinstance(body, dict) else None
    ids = [e.get("event_id") for e in events or () if isinstance(e, dict)]
    material = json.dumps(ids) if ids else json.dumps(body, sort_keys=True)
    return f"{txn_id}:{hashlib.sha256(material.encode()).hexdigest()[:32]}"
