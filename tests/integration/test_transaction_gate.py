"""The transaction gate (bridge/appservice/transactions.py) on its own: a real mautrix appservice
listener
and the bridge's own tables on each SQL engine, with no Synapse and no bridge process. What the
gate needs of the bridge is the small context of bridge/context.py; the one portal here is a
stand-in queue that finishes each event's work as the test says.

What Synapse sees: an appservice transaction is acknowledged (200) only once each of its portal
events is done; a transaction that arrives before the one it follows is refused once (500) so
that Synapse sends the missing one first; one whose events were not recorded is refused so that
Synapse sends it again; a replayed transaction is acknowledged without its events handled twice.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from matrix.synapse import free_port
from mautrix.appservice import AppService
from mautrix.appservice.state_store.memory import ASStateStore
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.types import EventID, MessageEvent, RoomID
from mautrix.util.async_db import Database

from bridge.appservice.transactions import TransactionGate
from bridge.portal_work import CURRENT_SLOT, EventSlot, FromMatrix
from bridge.run_state import RunState
from kalandra_core.storage import migrations

pytestmark = pytest.mark.filterwarnings("ignore:loop argument is deprecated:DeprecationWarning")

HS_TOKEN = "hs_gate_test"
ROOM = RoomID("!portal:localhost")


class _MemoryStateStore(ASStateStore, MemoryStateStore):  # (as mautrix's file store is)
    pass


@dataclass
class StandInPortal:
    """Reserves places like a portal's queue toward Kalandra; each place is done (or fails)
    when the test's ``outcome`` for its event says so."""

    mxid: RoomID = ROOM
    room_id: bytes = bytes(16)  # its Kalandra room
    reserved: list[EventID] = field(default_factory=list)
    handled: list[EventID] = field(default_factory=list)
    outcome: dict[EventID, Exception | None] = field(default_factory=dict)
    stuck: set[EventID] = field(default_factory=set)  # never done (their queue stopped)

    def reserve(self, event_id: EventID) -> EventSlot:
        slot = EventSlot(event_id)
        self.reserved.append(event_id)
        asyncio.get_running_loop().create_task(self._finish(slot))
        return slot

    async def _finish(self, slot: EventSlot) -> None:
        await slot.work
        if slot.event_id in self.stuck:
            return
        failure = self.outcome.get(slot.event_id)
        if failure is not None:
            slot.done.set_exception(failure)
            return
        self.handled.append(slot.event_id)
        slot.done.set_result(None)


@dataclass
class Directory:
    portal: StandInPortal

    def by_mxid(self, mxid: RoomID) -> StandInPortal | None:
        return self.portal if mxid == self.portal.mxid else None

    def all(self) -> Sequence[StandInPortal]:
        return []  # nothing to catch up on: no homeserver here


@dataclass
class GateContext:
    """The parts of the bridge the gate uses."""

    az: AppService
    db: Database
    portals: Directory
    run_state: RunState = field(default_factory=RunState)


@dataclass
class Listener:
    url: str
    portal: StandInPortal
    session: aiohttp.ClientSession
    gate: TransactionGate
    numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, txn_id: str, event_ids: list[str]) -> int:
        events = [_message(e) for e in event_ids]
        async with self.session.put(
            f"{self.url}/_matrix/app/v1/transactions/{txn_id}",
            json={"events": events},
            headers={"Authorization": f"Bearer {HS_TOKEN}"},
        ) as response:
            return response.status


def _message(event_id: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": "@alice:localhost",
        "event_id": event_id,
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": "hello"},
    }


@pytest.fixture
async def listener(db_url: str) -> AsyncIterator[Listener]:
    await migrations.upgrade(db_url)
    db = Database.create(db_url)
    await db.start()
    az = AppService(
        server="http://127.0.0.1:9",  # never called: nothing here talks to a homeserver
        domain="localhost",
        as_token="as_gate_test",
        hs_token=HS_TOKEN,
        bot_localpart="kalandrabot",
        id="gate-test",
        state_store=_MemoryStateStore(),
    )
    portal = StandInPortal()

    @az.matrix_event_handler
    async def fill(event: MessageEvent) -> None:  # what the bridge's handler does with a message
        slot = CURRENT_SLOT.get()
        if slot is not None:
            slot.fill(FromMatrix("message", event.sender, event.event_id))

    # Only what the gate uses: the rest of BridgeContext is not needed, and not there.
    gate = TransactionGate(GateContext(az, db, Directory(portal)))  # type: ignore[arg-type]
    gate.install()
    await gate.catch_up()  # the start-up catch-up (nothing to catch up: no portals listed)
    runner = web.AppRunner(az.app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Listener(f"http://127.0.0.1:{port}", portal, session, gate)
    finally:
        await runner.cleanup()
        await db.stop()


async def test_a_transaction_is_acknowledged_once_its_events_are_done(listener: Listener) -> None:
    assert await listener.send("1", ["$a", "$b"]) == 200
    assert listener.portal.handled == ["$a", "$b"]


async def test_a_replayed_transaction_is_acknowledged_without_handling_it_again(
    listener: Listener,
) -> None:
    assert await listener.send("1", ["$a"]) == 200
    assert await listener.send("1", ["$a"]) == 200
    assert listener.portal.reserved == ["$a"]
    # The same id with other events is a new transaction (Synapse reuses ids after a restart
    # of its own), in its order: taken too.
    assert await listener.send("1", ["$b"]) == 200
    assert listener.portal.handled == ["$a", "$b"]


async def test_a_transaction_ahead_of_its_predecessor_is_refused_once(listener: Listener) -> None:
    assert await listener.send("1", ["$a"]) == 200
    assert await listener.send("3", ["$c"]) == 500  # 2 is missing: Synapse sends it first
    assert listener.portal.reserved == ["$a"]  # nothing of 3 was queued
    assert await listener.send("2", ["$b"]) == 200
    assert await listener.send("3", ["$c"]) == 200
    assert listener.portal.handled == ["$a", "$b", "$c"]


async def test_a_transaction_whose_event_was_not_recorded_is_sent_again(
    listener: Listener,
) -> None:
    listener.portal.outcome[EventID("$a")] = RuntimeError("the database refused the record")
    assert await listener.send("1", ["$a", "$b"]) == 500
    assert listener.portal.handled == ["$b"]
    del listener.portal.outcome[EventID("$a")]
    assert await listener.send("1", ["$a", "$b"]) == 200  # Synapse's retry
    # Both were queued again: the portal knows $b by its record (DedupeTable) and skips it.
    assert listener.portal.reserved == ["$a", "$b", "$a", "$b"]
    assert listener.portal.handled.count(EventID("$a")) == 1


async def test_a_transaction_in_progress_at_shutdown_is_answered_retry_at_once(
    listener: Listener,
) -> None:
    listener.portal.stuck.add(EventID("$a"))  # its portal's queue has stopped
    sending = asyncio.create_task(listener.send("1", ["$a"]))
    async with asyncio.timeout(30):
        while EventID("$a") not in listener.portal.reserved:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert not sending.done()  # it waits for its event, as it should while running
    listener.gate.stop()
    async with asyncio.timeout(30):  # not the minute aiohttp's shutdown would wait for it
        assert await sending == 500  # not acknowledged: Synapse sends it again
    assert listener.portal.handled == []
