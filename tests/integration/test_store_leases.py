"""Room leases and fencing: on real PostgreSQL (two stores on one database, as two processes
would be) and on MemoryStore with a virtual clock (what the simulation uses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from integration.store_helpers import entries, new_room, state_of

from kalandra_core.storage import Fenced, SqlStore, StoreError
from kalandra_core.storage.base import Store
from kalandra_core.storage.memory import MemoryStore


@dataclass
class Pair:
    """Two nodes' views of one store, and a way to let ``seconds`` pass on its clock."""

    a: Store
    b: Store
    wait: Callable[[float], Awaitable[None]]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "memory"])
def pair_url(request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database, or None for MemoryStore."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def pair(pair_url: str | None) -> AsyncIterator[Pair]:
    if pair_url is None:
        clock = _Clock()
        shared = MemoryStore(clock=clock)

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Pair(shared, shared, advance)
        return
    a = await SqlStore.open(pair_url)
    b = await SqlStore.open(pair_url, migrate=False)
    try:
        yield Pair(a, b, asyncio.sleep)
    finally:
        await a.close()
        await b.close()


async def test_a_held_lease_is_refused_to_another_node(pair: Pair) -> None:
    rid = await new_room(pair.a)
    first = await pair.a.acquire_lease(rid, "node-a", 30)
    assert first.token is not None
    assert first.owner == "node-a"
    refused = await pair.b.acquire_lease(rid, "node-b", 30)
    assert refused.token is None
    assert refused.owner == "node-a"
    assert await pair.b.lease_owner(rid) == "node-a"
    # The same node again (started anew under its name): a new, greater token at once.
    again = await pair.a.acquire_lease(rid, "node-a", 30)
    assert again.token is not None
    assert again.token > first.token


async def test_an_expired_lease_is_taken_with_a_greater_token(pair: Pair) -> None:
    rid = await new_room(pair.a)
    first = await pair.a.acquire_lease(rid, "node-a", 0.3)
    assert first.token is not None
    await pair.wait(0.5)
    assert await pair.b.lease_owner(rid) is None
    taken = await pair.b.acquire_lease(rid, "node-b", 30)
    assert taken.token is not None
    assert taken.token > first.token
    assert await pair.a.lease_owner(rid) == "node-b"
    # The former owner's renewal finds it lost; the new owner's keeps it.
    assert await pair.a.renew_leases("node-a", {rid: first.token}, 30) == [rid]
    assert await pair.b.renew_leases("node-b", {rid: taken.token}, 30) == []


async def test_a_stale_token_writes_nothing(pair: Pair) -> None:
    rid = await new_room(pair.a)
    old = await pair.a.acquire_lease(rid, "node-a", 0.3)
    assert old.token is not None
    await pair.a.append(rid, entries(0, 2), fence=old.token)
    await pair.wait(0.5)
    new = await pair.b.acquire_lease(rid, "node-b", 30)
    assert new.token is not None
    with pytest.raises(Fenced):
        await pair.a.append(rid, entries(2, 3), fence=old.token)
    with pytest.raises(Fenced):
        await pair.a.redact(rid, 0, fence=old.token)
    with pytest.raises(Fenced):
        await pair.a.put_welcome(rid, 7, b"welcome", fence=old.token)
    with pytest.raises(Fenced):
        await pair.a.put_group_info(rid, 1, b"group info", fence=old.token)
    # Nothing of the fenced writes is stored.
    assert (await state_of(pair.b, rid)).room.next_log_index == 2
    frames = await pair.b.load_frames(rid, 0, 10)
    assert [f.log_index for f in frames] == [0, 1]
    assert frames[0].payload is not None
    assert await pair.b.pending_welcomes(7) == []
    assert await pair.b.get_group_info(rid) is None
    # The new owner continues the numbering.
    await pair.b.append(rid, entries(2, 1), fence=new.token)
    assert (await state_of(pair.a, rid)).room.next_log_index == 3


async def test_a_lease_handed_over_to_a_live_node_fences_the_giver(pair: Pair) -> None:
    rid = await new_room(pair.a)
    held = await pair.a.acquire_lease(rid, "node-a", 30)
    assert held.token is not None
    # Only to a node alive now.
    assert not await pair.a.hand_over_lease(rid, "node-a", held.token, "node-b", 30)
    assert await pair.a.lease_owner(rid) == "node-a"
    assert await pair.b.node_alive("node-b", 30) == {"node-b": 0}
    assert await pair.a.node_alive("node-a", 30) == {"node-a": 1, "node-b": 0}
    assert await pair.a.hand_over_lease(rid, "node-a", held.token, "node-b", 30)
    assert await pair.b.lease_owner(rid) == "node-b"
    assert await pair.b.leases_of("node-b") == [rid]
    assert await pair.a.leases_of("node-a") == []
    # The giver's token is stale at once; the taker takes its lease without waiting.
    with pytest.raises(Fenced):
        await pair.a.append(rid, entries(0, 1), fence=held.token)
    assert not await pair.a.hand_over_lease(rid, "node-a", held.token, "node-b", 30)
    taken = await pair.b.acquire_lease(rid, "node-b", 30)
    assert taken.token == held.token + 2
    await pair.b.append(rid, entries(0, 1), fence=taken.token)
    # A node that leaves is not alive any more (its leases are still its own).
    assert await pair.b.node_alive("node-b", 0) == {"node-a": 0}


async def test_a_room_never_leased_refuses_a_fenced_write(pair: Pair) -> None:
    rid = await new_room(pair.a)
    with pytest.raises(Fenced):
        await pair.a.append(rid, entries(0, 1), fence=1)
    assert (await state_of(pair.a, rid)).room.next_log_index == 0


async def test_renewal_keeps_every_held_lease_and_reports_the_lost(pair: Pair) -> None:
    rooms = [await new_room(pair.a, n) for n in (1, 2, 3)]
    held: dict[bytes, int] = {}
    for rid in rooms:
        grant = await pair.a.acquire_lease(rid, "node-a", 0.4)
        assert grant.token is not None
        held[rid] = grant.token
    await pair.wait(0.2)
    assert await pair.a.renew_leases("node-a", held, 0.4) == []
    await pair.wait(0.3)  # past the first term, within the renewed one
    assert (await pair.b.acquire_lease(rooms[0], "node-b", 30)).token is None
    await pair.a.release_lease(rooms[1], "node-a", held[rooms[1]])
    released = await pair.b.acquire_lease(rooms[1], "node-b", 30)
    assert released.token is not None
    assert released.token > held[rooms[1]]
    assert await pair.a.renew_leases("node-a", held, 30) == [rooms[1]]


@pytest.mark.postgres
async def test_concurrent_acquisitions_have_one_winner(postgres_url: str) -> None:
    stores = [await SqlStore.open(postgres_url, migrate=i == 0) for i in range(4)]
    try:
        rid = await new_room(stores[0])
        grants = await asyncio.gather(
            *(s.acquire_lease(rid, f"node-{i}", 30) for i, s in enumerate(stores))
        )
        winners = [g for g in grants if g.token is not None]
        assert len(winners) == 1
        assert {g.owner for g in grants} == {winners[0].owner}
    finally:
        for s in stores:
            await s.close()


@pytest.mark.postgres
async def test_an_acquisition_waits_for_a_fenced_write_in_flight(postgres_url: str) -> None:
    """The fence holds the lease row until the write commits: a taker that comes during the
    write gets the lease after it, and then reads the frames the write stored."""
    a = await SqlStore.open(postgres_url)
    b = await SqlStore.open(postgres_url, migrate=False)
    try:
        rid = await new_room(a)
        old = await a.acquire_lease(rid, "node-a", 0.2)
        assert old.token is not None
        await asyncio.sleep(0.3)

        async def write_all() -> None:
            for i in range(20):
                try:
                    await a.append(rid, entries(i, 1), fence=old.token)
                except Fenced:
                    return

        results = await asyncio.gather(
            write_all(), b.acquire_lease(rid, "node-b", 30), return_exceptions=True
        )
        taken = results[1]
        assert not isinstance(taken, BaseException)
        assert taken.token is not None
        stored = (await state_of(b, rid)).room.next_log_index
        # Every frame stored before the taking; none after it (the rest were fenced).
        assert [f.log_index for f in await b.load_frames(rid, 0, 50)] == list(range(stored))
        await b.append(rid, entries(stored, 1), fence=taken.token)
    finally:
        await a.close()
        await b.close()


async def test_sqlite_has_no_leases(sqlite_url: str) -> None:
    store = await SqlStore.open(sqlite_url)
    try:
        rid = await new_room(store)
        with pytest.raises(StoreError, match="PostgreSQL"):
            await store.acquire_lease(rid, "node-a", 10)
    finally:
        await store.close()


async def test_the_bridge_bot_recorded_by_one_node_is_read_by_another(pair: Pair) -> None:
    assert await pair.b.bridge_bot() is None
    high = (1 << 64) - 5  # member ids are unsigned 64-bit
    await pair.a.record_bridge_bot(high, "@kalandrabot:example.org")
    assert await pair.b.bridge_bot() == (high, "@kalandrabot:example.org")
    await pair.a.record_bridge_bot(7, "@bot:example.org")  # a new record replaces the old
    assert await pair.b.bridge_bot() == (7, "@bot:example.org")
    assert await pair.b.forget_bridge_bot()  # the bridge left the cluster
    assert await pair.a.bridge_bot() is None
    assert not await pair.a.forget_bridge_bot()
