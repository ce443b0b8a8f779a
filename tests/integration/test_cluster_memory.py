"""Cluster mode in one process: two hubs on one MemoryStore (its clock is the "database
clock", moved by hand) and a MemoryBus, clients on loopback connections to either hub. The
same parts a deterministic simulation of several nodes drives on virtual time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers.native import next_message, within
from nacl.signing import SigningKey

from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.events import Typing
from kalandra_core.client.extras import ExtendedCore, set_typing
from kalandra_core.server import bus, rebalance
from kalandra_core.server.bus import MemoryBus, MemoryNetwork
from kalandra_core.server.cluster import ClusterNode
from kalandra_core.server.config import ClusterConfig, ServerConfig
from kalandra_core.server.hub import Hub
from kalandra_core.storage.memory import MemoryStore
from kalandra_core.transport.loopback import loopback_connector

LEASE = 10.0


class StoreClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Cluster:
    store: MemoryStore
    clock: StoreClock
    network: MemoryNetwork
    hubs: dict[str, Hub]
    clients: list[Client]

    async def shared_room(self) -> tuple[Client, Client, bytes]:
        """alice on node A made a room and bob, on node B, joined it."""
        alice = await self.client("A", "alice")
        bob = await self.client("B", "bob")
        room = await within(alice.create_room(name="shared"))
        await within(alice.invite(room, [bob.core.member_id]))
        assert await within(bob.joined.get()) == room
        return alice, bob, room

    async def client(self, node: str, name: str) -> Client:
        account = await self.store.create_member(f"{name}-{os.urandom(3).hex()}")
        token = await self.store.issue_token(account.member_id)
        client = Client(
            ExtendedCore(account.member_id, os.urandom(32)),  # reports typing too
            ServerAddress("tcp", node, 1),
            token,
            connector=loopback_connector(self.hubs[node].session_factory),
            request_timeout=15.0,
        )
        self.clients.append(client)
        await within(client.connect())
        await within(client.publish_key_packages(2))
        return client


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    clock = StoreClock()
    store = MemoryStore(clock=clock)
    network = MemoryNetwork()
    # Renewals never come within a test (the store's clock moves only by hand); a forwarded
    # frame is given up on after 0.3 s.
    config = ClusterConfig(
        enabled=True, lease_seconds=LEASE, renew_seconds=1000.0, forward_timeout=0.3
    )
    hubs: dict[str, Hub] = {}
    for node in ("A", "B"):
        cluster = ClusterNode(config, store, MemoryBus(network, node))
        hub = Hub(store, ServerConfig(), SigningKey.generate(), cluster=cluster)
        hub.start()
        await hub.start_cluster()
        hubs[node] = hub
    running = Cluster(store, clock, network, hubs, [])
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        for hub in hubs.values():
            await hub.stop()


async def test_clients_on_two_nodes_share_a_room(cluster: Cluster) -> None:
    alice, bob, room = await cluster.shared_room()
    assert await cluster.store.lease_owner(room) == "A"
    assert set(cluster.hubs["A"].rooms) == {room}
    assert not cluster.hubs["B"].rooms

    index = await within(bob.send_text(room, "from B, sequenced on A"))
    got = await next_message(alice, lambda m: m.content.body == "from B, sequenced on A")
    assert got.log_index == index
    await within(alice.send_text(room, "from A"))
    await next_message(bob, lambda m: m.content.body == "from A")

    # Ephemeral frames cross nodes too: bob (on B) types, alice (on A) is told.
    set_typing(bob, room, True)
    typing = await within(_next_typing(alice))
    assert (typing.room_id, typing.sender_id, typing.typing) == (room, bob.core.member_id, True)


async def _next_typing(client: Client) -> Typing:
    while True:
        event = await client.events.get()
        if isinstance(event, Typing):
            return event


async def test_a_node_told_of_a_bus_gap_has_its_clients_catch_up(cluster: Cluster) -> None:
    alice, bob, room = await cluster.shared_room()
    assert await cluster.store.lease_owner(room) == "A"

    cluster.network.down.add("B")  # B's listener is away: the fan-out below is lost to it
    index = await within(alice.send_text(room, "while B was away"))
    cluster.network.down.discard("B")
    assert bob.core.rooms[room].last_seen < index  # the room stays quiet: nothing tells bob
    cluster.network.gap("B")  # B listens again and is told it may have missed messages
    got = await next_message(bob, lambda m: m.content.body == "while B was away")
    assert got.log_index == index


async def test_a_dead_owner_s_room_is_taken_once_its_lease_ran_out(cluster: Cluster) -> None:
    _alice, bob, room = await cluster.shared_room()
    first = await within(bob.send_text(room, "one"))

    cluster.network.down.add("A")  # A hears nothing more (it is "dead" to the others)
    cluster.clock.now += LEASE + 1  # and its lease has run out by the store's clock
    second = await within(bob.send_text(room, "two"))
    assert second == first + 1
    assert await cluster.store.lease_owner(room) == "B"
    assert room in cluster.hubs["B"].rooms
    frames = await cluster.store.load_frames(room, 0, 100)
    assert [f.log_index for f in frames] == list(range(second + 1))


async def test_a_renewal_that_finds_the_lease_gone_stops_the_worker(cluster: Cluster) -> None:
    alice = await cluster.client("A", "alice")
    room = await within(alice.create_room(name="mine"))
    await within(alice.send_text(room, "one"))
    hub_a = cluster.hubs["A"]
    assert room in hub_a.rooms
    cluster.clock.now += LEASE + 1
    taken = await cluster.store.acquire_lease(room, "B", LEASE)
    assert taken.token is not None
    assert hub_a.cluster is not None
    await hub_a.cluster.renew()
    assert room not in hub_a.rooms
    assert room not in hub_a.cluster.held


@pytest.mark.parametrize("clustered", [True, False])
async def test_room_ids_that_name_no_room_leave_nothing_behind(
    cluster: Cluster, clustered: bool
) -> None:
    hub = cluster.hubs["A"]
    if not clustered:
        hub = Hub(cluster.store, ServerConfig(), SigningKey.generate())
    for n in range(20):
        assert await hub.route((1000 + n).to_bytes(16, "big")) is None
    assert hub.rooms == {}
    assert hub.opening == 0


async def test_frames_a_lost_worker_held_go_to_the_new_owner_in_order(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's lease is lost while its worker stores alice's "one" and her "two" waits behind it:
    the write is fenced, and both are sequenced by the new owner, in order, neither refused."""
    alice = await cluster.client("A", "alice")
    room = await within(alice.create_room(name="mine"))
    hub_a = cluster.hubs["A"]
    assert hub_a.cluster is not None
    store = cluster.store
    append, held = store.append, asyncio.Event()
    gate: list[asyncio.Event] = [held]

    async def slow_append(*args: Any, **kw: Any) -> None:
        if gate:
            gate.pop().set()  # the batch is under way; let the test take the lease meanwhile
            await release.wait()
        await append(*args, **kw)

    release = asyncio.Event()
    monkeypatch.setattr(store, "append", slow_append)
    one = asyncio.create_task(alice.send_text(room, "one"))
    await within(held.wait())
    cluster.clock.now += LEASE + 1
    assert (await store.acquire_lease(room, "B", LEASE)).token is not None
    await hub_a.cluster.renew()  # finds the lease gone while the batch is under way
    two = asyncio.create_task(alice.send_text(room, "two"))
    # "two" reaches A: it waits behind "one" in the lost worker (still the room's way in
    # until its batch is done), or (what it must not do) goes on to B at once.
    while not (room in hub_a.rooms and hub_a.rooms[room].queued) and not two.done():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    release.set()
    first, second = await within(one), await within(two)
    assert second == first + 1  # "one" (sent first) sequenced just before "two"
    assert room in cluster.hubs["B"].rooms
    assert room not in hub_a.rooms


def lose_the_next_forward(monkeypatch: pytest.MonkeyPatch, node: ClusterNode) -> asyncio.Event:
    """The next Forward ``node`` sends is lost, as a NOTIFY is lost while the receiver's
    listener reconnects; the event is set once it is."""
    send, lost = node.bus.send, asyncio.Event()

    def lossy(target: str, body: bytes) -> None:
        if isinstance(bus.decode(body), bus.Forward) and not lost.is_set():
            lost.set()
            return
        send(target, body)

    monkeypatch.setattr(node.bus, "send", lossy)
    return lost


async def test_a_frame_after_one_the_bus_lost_is_not_sequenced_before_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob (on B) sends "one" and "two" to A's room; the bus loses the forward of "one". A
    must not sequence "two" first: both are routed again, in order, once A is given up on."""
    _alice, bob, room = await cluster.shared_room()
    node_b = cluster.hubs["B"].cluster
    assert node_b is not None
    lost = lose_the_next_forward(monkeypatch, node_b)
    one = asyncio.create_task(bob.send_text(room, "one"))
    await within(lost.wait())
    two = asyncio.create_task(bob.send_text(room, "two"))
    # A's lease runs out meanwhile (nobody took it: A would still sequence what reaches it),
    # so that, once A is given up on, the frames routed again can be served by B.
    cluster.clock.now += LEASE + 1
    first, second = await within(one), await within(two)
    assert first < second


async def test_a_lost_forward_to_a_live_owner_waits_for_no_lease(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but A's lease does not run out (the store's clock stands still): A answers
    when asked whether it is there, so both frames go to it again at once, in order."""
    _alice, bob, room = await cluster.shared_room()
    node_b = cluster.hubs["B"].cluster
    assert node_b is not None
    lost = lose_the_next_forward(monkeypatch, node_b)
    one = asyncio.create_task(bob.send_text(room, "one"))
    await within(lost.wait())
    two = asyncio.create_task(bob.send_text(room, "two"))
    first, second = await within(one), await within(two)
    assert first < second
    assert await cluster.store.lease_owner(room) == "A"
    assert room not in cluster.hubs["B"].rooms


async def test_a_room_handed_over_mid_traffic_keeps_every_frame_once_in_order(
    cluster: Cluster,
) -> None:
    alice, bob, room = await cluster.shared_room()
    assert await cluster.store.lease_owner(room) == "A"

    # Both send while A hands the room over to B: frames are in A's worker, on the bus to A,
    # and arrive at A during the handover (they wait there, then follow the room to B).
    store = cluster.store
    give = store.hand_over_lease

    async def slow_hand_over(*args: Any) -> bool:
        await asyncio.sleep(0.05)  # a database's round trip, while frames come in
        return await give(*args)

    store.hand_over_lease = slow_hand_over  # type: ignore[method-assign,assignment]
    senders = ((alice, "alice"), (bob, "bob"))

    def send(i: int) -> list[asyncio.Task[int]]:
        return [asyncio.create_task(c.send_text(room, f"{name} {i}")) for c, name in senders]

    sends = [t for i in range(5) for t in send(i)]
    await asyncio.sleep(0)
    handover = asyncio.create_task(cluster.hubs["A"].hand_over(room, "B"))
    for i in range(5, 10):
        await asyncio.sleep(0.01)
        sends += send(i)
    assert await within(handover)
    indexes = await within(asyncio.gather(*sends))

    assert await cluster.store.lease_owner(room) == "B"
    assert room not in cluster.hubs["A"].rooms
    stored = await cluster.store.load_frames(room, 0, 1000)
    assert [f.log_index for f in stored] == list(range(len(stored)))
    assert len(set(indexes)) == len(indexes)
    for offset in (0, 1):  # each sender's messages in the order sent
        mine = indexes[offset::2]
        assert mine == sorted(mine)
    # B sequences from now on, and both see it.
    index = await within(alice.send_text(room, "after"))
    got = await next_message(bob, lambda m: m.content.body == "after")
    assert got.log_index == index
    assert room in cluster.hubs["B"].rooms


async def test_a_node_listed_alive_that_does_not_answer_is_given_no_rooms(
    cluster: Cluster,
) -> None:
    # B marked itself alive (its first look) and then stopped answering: dead, or paused, its
    # row in the node list not run out yet. A rebalancing A must not hand it rooms, which would
    # wait for a failover; once B answers again, it gets its share.
    alice = await cluster.client("A", "alice")
    rooms = [await within(alice.create_room(name=f"room {n}")) for n in range(4)]
    for room in rooms:
        await within(alice.send_text(room, "busy"))
    hub_a = cluster.hubs["A"]
    assert hub_a.cluster is not None
    assert sorted(hub_a.held_rooms()) == sorted(rooms)
    cluster.network.down.add("B")
    await within(rebalance.look(hub_a.cluster, hub_a, time.monotonic))
    assert [await cluster.store.lease_owner(r) for r in rooms] == ["A"] * 4
    assert sorted(hub_a.held_rooms()) == sorted(rooms)
    for room in rooms:  # served as before
        await within(alice.send_text(room, "still here"))

    cluster.network.down.discard("B")
    await within(rebalance.look(hub_a.cluster, hub_a, time.monotonic))
    owners = [await cluster.store.lease_owner(r) for r in rooms]
    assert owners.count("B") == 2, owners
    for room in rooms:
        await within(alice.send_text(room, "after the move"))


async def test_the_bridge_s_bot_is_named_as_recorded_now(cluster: Cluster) -> None:
    # A's process embeds the bridge; B names its bot as recorded, and stops once the bridge
    # is taken out of the cluster (or names the new one when another bridge replaces it).
    hub_a, hub_b = cluster.hubs["A"], cluster.hubs["B"]
    assert hub_a.cluster is not None
    assert hub_b.cluster is not None
    await hub_a.announce_bridge_bot(7, "@bot:example.org")
    assert await hub_b.cluster.learn_bridge_bot()
    assert hub_b.bridge_bot == (7, "@bot:example.org")
    alice = await cluster.client("B", "alice")
    assert (alice.core.bridge_member_id, alice.core.bridge_mxid) == (7, "@bot:example.org")

    await cluster.store.record_bridge_bot(8, "@newbot:example.org")
    assert await hub_b.cluster.learn_bridge_bot()
    assert hub_b.bridge_bot == (8, "@newbot:example.org")

    assert await cluster.store.forget_bridge_bot()
    assert not await hub_b.cluster.learn_bridge_bot()
    bob = await cluster.client("B", "bob")
    assert (bob.core.bridge_member_id, bob.core.bridge_mxid) == (None, None)
    # The process that embeds it keeps naming its own bridge.
    assert await hub_a.cluster.learn_bridge_bot()
    assert hub_a.bridge_bot == (7, "@bot:example.org")
