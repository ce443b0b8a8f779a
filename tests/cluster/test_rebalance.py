"""Acceptance of rebalancing: two server processes serve busy rooms, with clients on both; a third
process starts, and rooms are handed over to it while the traffic flows. Nothing acknowledged is
lost, numbered twice or reordered, and every client ends on the same log and epoch."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from acceptance.acceptance_harness import Harness, ServerProcess, shared_room
from cluster.cluster_harness import Sender, cluster, harnesses, pause, resume, start_node
from cluster.test_failover import check_log, converged, log_of
from helpers.native import within
from helpers.sql import query

from kalandra_core.client.driver import Client
from kalandra_core.storage.sql import SqlStore

pytestmark = pytest.mark.postgres

ROOMS = 6  # three on each of the two first nodes: each is over its share once a third starts
_HANDED = re.compile(r"room ([0-9a-f]+): handed over to (\S+) in ([0-9.]+) ms")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[str, list[ServerProcess]]]:
    with cluster(tmp_path, 2) as running:
        yield running


@pytest.fixture
async def two(
    processes: tuple[str, list[ServerProcess]], tmp_path: Path
) -> AsyncIterator[tuple[list[Harness], str, list[ServerProcess]]]:
    url, nodes = processes
    store = await SqlStore.open(url, migrate=False)
    hs = harnesses(nodes, store, tmp_path)
    try:
        yield hs, url, nodes
    finally:
        for h in hs:
            await h.close()
        await store.close()


async def owners(store: SqlStore, rooms: list[bytes]) -> dict[bytes, str | None]:
    return {room: await store.lease_owner(room) for room in rooms}


async def until_owned_by(store: SqlStore, rooms: list[bytes], node: str) -> None:
    while node not in (await owners(store, rooms)).values():  # noqa: ASYNC110 - the database
        await asyncio.sleep(0.2)


async def test_a_started_process_takes_rooms_while_traffic_flows(
    two: tuple[list[Harness], str, list[ServerProcess]], tmp_path: Path
) -> None:
    hs, url, nodes = two
    store = hs[0].store
    alice_u, bob_u, carol_u = await hs[0].users("alice", "bob", "carol")
    alice = await hs[0].connect(alice_u, key_packages=ROOMS + 1)  # on node0
    bob = await hs[1].connect(bob_u, key_packages=ROOMS + 1)  # on node1
    carol = await hs[1].connect(carol_u, key_packages=ROOMS + 1)
    rooms = []
    for i in range(ROOMS):
        # Created through either node (which takes it); the two share the rooms out.
        if i % 2:
            rooms.append(await shared_room(hs[0], alice, (bob, bob_u), (carol, carol_u)))
        else:
            rooms.append(await shared_room(hs[1], bob, (alice, alice_u), (carol, carol_u)))
    before = await owners(store, rooms)
    assert set(before.values()) <= {"node0", "node1"}

    stop = asyncio.Event()
    senders = [
        Sender(client, room, f"{name}{r}")
        for r, room in enumerate(rooms)
        for client, name in ((alice, "alice"), (bob, "bob"), (carol, "carol"))
    ]
    runs = [asyncio.create_task(s.run(1_000_000, stop)) for s in senders]
    await within(alice.wait_for(lambda: sum(len(s.acked) for s in senders) >= 60), 60)

    nodes.append(await asyncio.to_thread(start_node, tmp_path, url, "node2"))
    await within(until_owned_by(store, rooms, "node2"), 60)
    # Traffic goes on after the handovers: every sender has more acknowledged.
    counts = [len(s.acked) for s in senders]
    await within(
        alice.wait_for(
            lambda: all(len(s.acked) >= n + 5 for s, n in zip(senders, counts, strict=True))
        ),
        60,
    )
    stop.set()
    await within(asyncio.gather(*runs), 60)

    after = await owners(store, rooms)
    moved = [room for room in rooms if after[room] != before[room]]
    assert "node2" in after.values(), after
    handed = [m for n in nodes for m in _HANDED.finditer(n.log.read_text(errors="replace"))]
    assert {m.group(1) for m in handed} >= {r.hex() for r in moved if after[r] == "node2"}
    times = sorted(float(m.group(3)) for m in handed)
    print(
        f"{len(moved)} of {ROOMS} rooms moved ({sum(1 for v in after.values() if v == 'node2')}"
        f" to node2); handovers took {times[0]:.1f} to {times[-1]:.1f} ms"
    )
    # Handed over gracefully: nobody was told to retry, nothing timed out.
    assert [s.refusals for s in senders if s.refusals] == []

    clients: list[Client] = [alice, bob, carol]
    for room in rooms:
        mine = [s for s in senders if s.room_id == room]
        log = await log_of(store, room)
        check_log(log, mine)
        for s in mine:
            # A sender's messages are in the log in the order it sent them.
            indexes = [s.acked[f"{s.name} {i}"] for i in range(len(s.acked))]
            assert indexes == sorted(indexes), f"{s.name}: out of order"
        if after[room] == "node2":
            # The new owner moves the room's epoch on too.
            await within(alice.self_update(room), 30)
            log = await log_of(store, room)
        await converged(clients, room, len(log))


@pytest.fixture
def single(tmp_path: Path) -> Iterator[tuple[str, list[ServerProcess]]]:
    with cluster(tmp_path, 1) as running:
        yield running


async def test_a_paused_process_still_listed_alive_is_handed_no_rooms(
    single: tuple[str, list[ServerProcess]], tmp_path: Path
) -> None:
    # node1 looks once every 30 s, so its row in the node list stays valid for half a minute
    # after it is paused: node0 sees it listed alive, holds every room, and must not hand it
    # any (they would wait for a failover). Once node1 runs again it gets its share.
    url, nodes = single
    nodes.append(await asyncio.to_thread(start_node, tmp_path, url, "node1", 30.0))
    listed = "SELECT node FROM cluster_nodes WHERE node = 'node1'"
    while not await query(url, listed):  # noqa: ASYNC110 - the database
        await asyncio.sleep(0.1)
    pause(nodes[1])
    store = await SqlStore.open(url, migrate=False)
    hs = harnesses(nodes, store, tmp_path)
    try:
        alice_u, bob_u = await hs[0].users("alice", "bob")
        alice = await hs[0].connect(alice_u, key_packages=5)
        bob = await hs[0].connect(bob_u, key_packages=5)
        rooms = [await shared_room(hs[0], alice, (bob, bob_u)) for _ in range(4)]
        # Several of node0's looks (one a second), each of which would move two rooms.
        for _ in range(4):
            await asyncio.sleep(1.0)
            for room in rooms:
                await within(alice.send_text(room, "served"), 5)
        assert set((await owners(store, rooms)).values()) == {"node0"}
        assert "node1 listed alive but not answering" in nodes[0].log.read_text()

        resume(nodes[1])
        await within(until_owned_by(store, rooms, "node1"), 60)
        for room in rooms:
            await within(alice.send_text(room, "after"), 30)
    finally:
        for h in hs:
            await h.close()
        await store.close()
