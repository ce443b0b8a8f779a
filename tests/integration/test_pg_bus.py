"""The cluster's bus on real PostgreSQL: order, bodies over NOTIFY's limit, broadcasts, a
connection the database drops, and fan-out a node's listener missed meanwhile reaching its
clients all the same."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers.native import next_message, within
from nacl.signing import SigningKey

from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.extras import ExtendedCore
from kalandra_core.server.cluster import ClusterNode
from kalandra_core.server.config import ClusterConfig, ServerConfig
from kalandra_core.server.hub import Hub
from kalandra_core.server.pg_bus import PgBus
from kalandra_core.storage.sql import SqlStore
from kalandra_core.transport.loopback import loopback_connector

pytestmark = pytest.mark.postgres


class Inbox:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.changed = asyncio.Event()

    def __call__(self, body: bytes) -> None:
        self.bodies.append(body)
        self.changed.set()

    async def until(self, count: int) -> list[bytes]:
        while len(self.bodies) < count:
            self.changed.clear()
            await self.changed.wait()
        return self.bodies


@pytest.fixture
async def buses(postgres_url: str) -> AsyncIterator[tuple[list[PgBus], list[Inbox]]]:
    await (await SqlStore.open(postgres_url)).close()  # the schema (cluster_mail)
    buses = [PgBus(postgres_url, f"node{i}") for i in range(3)]
    inboxes = [Inbox() for _ in buses]
    for bus, inbox in zip(buses, inboxes, strict=True):
        await bus.start(inbox)
    try:
        yield buses, inboxes
    finally:
        for bus in buses:
            await bus.close()


async def test_messages_arrive_in_order_whatever_their_size(
    buses: tuple[list[PgBus], list[Inbox]],
) -> None:
    (a, _, _), (_, inbox_b, inbox_c) = buses
    sizes = [10, 7000, 20, 100_000, 30, 5000, 1, 300_000] * 10
    sent = [os.urandom(size) for size in sizes]
    for body in sent:
        a.send("node1", body)
    assert await within(inbox_b.until(len(sent))) == sent
    assert inbox_c.bodies == []


async def test_a_broadcast_reaches_every_other_node_once(
    buses: tuple[list[PgBus], list[Inbox]],
) -> None:
    (a, b, _), (inbox_a, inbox_b, inbox_c) = buses
    big = os.urandom(50_000)
    a.broadcast(b"one")
    a.broadcast(big)
    a.send("node1", b"two")
    b.broadcast(b"three")
    assert await within(inbox_b.until(3)) == [b"one", big, b"two"]
    got = await within(inbox_c.until(3))
    # Each sender's order is kept; two senders' messages interleave as they commit.
    assert [m for m in got if m != b"three"] == [b"one", big]
    assert sorted(got, key=len) == [b"one", b"three", big]
    assert await within(inbox_a.until(1)) == [b"three"]
    await asyncio.sleep(0.3)
    assert len(inbox_a.bodies) == 1  # nothing of its own


async def test_the_bus_comes_back_after_its_connections_are_dropped(
    buses: tuple[list[PgBus], list[Inbox]], postgres_url: str
) -> None:
    (a, _, _), (_, inbox_b, _) = buses
    a.send("node1", b"before")
    await within(inbox_b.until(1))
    admin = await asyncpg.connect(postgres_url)
    try:
        dropped = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'kalandra-bus node1' AND datname = current_database()"
        )
    finally:
        await admin.close()
    assert dropped == 3

    async def delivered_again() -> None:
        # What is sent while node1 is away is lost; once it is back, messages arrive again.
        n = 0
        while inbox_b.bodies[-1] != b"after %d" % (n - 1) or n == 0:
            a.send("node1", b"after %d" % n)
            n += 1
            await asyncio.sleep(0.2)

    await within(delivered_again(), 20)


_LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 AND query LIKE 'LISTEN%'"
)


async def test_fan_out_missed_while_the_listener_reconnects_still_reaches_the_client(
    postgres_url: str,
) -> None:
    # Two nodes on PgBus; the room is sequenced on A, bob is connected to B. B's listening
    # backend is terminated and a message sequenced before B listens again: its NOTIFY is lost
    # to B, and the room stays quiet after it, so only B's handling of the gap brings it to bob.
    config = ClusterConfig(enabled=True, lease_seconds=30.0, renew_seconds=5.0)
    stores: list[SqlStore] = []
    hubs: dict[str, Hub] = {}
    clients: list[Client] = []
    admin = await asyncpg.connect(postgres_url)

    async def client(node: str, name: str) -> Client:
        account = await stores[0].create_member(f"{name}-{os.urandom(3).hex()}")
        token = await stores[0].issue_token(account.member_id)
        c = Client(
            ExtendedCore(account.member_id, os.urandom(32)),
            ServerAddress("tcp", node, 1),
            token,
            connector=loopback_connector(hubs[node].session_factory),
            request_timeout=15.0,
        )
        clients.append(c)
        await within(c.connect())
        await within(c.publish_key_packages(2))
        return c

    try:
        for node in ("gap-A", "gap-B"):
            store = await SqlStore.open(postgres_url)
            stores.append(store)
            hub = Hub(
                store,
                ServerConfig(),
                SigningKey.generate(),
                cluster=ClusterNode(config, store, PgBus(postgres_url, node)),
            )
            hub.start()
            await hub.start_cluster()
            hubs[node] = hub
        alice = await client("gap-A", "alice")
        bob = await client("gap-B", "bob")
        room = await within(alice.create_room(name="quiet"))
        await within(alice.invite(room, [bob.core.member_id]))
        assert await within(bob.joined.get()) == room
        assert await stores[0].lease_owner(room) == "gap-A"
        await within(alice.send_text(room, "before"))
        await next_message(bob, lambda m: m.content.body == "before")

        async def sent_while_b_deaf() -> str:
            # Until a message was acknowledged while no backend of B listened (B reconnects
            # within a second; an attempt it won is made again).
            for attempt in range(20):
                old = [r["pid"] for r in await admin.fetch(_LISTENERS, "kalandra-bus gap-B")]
                assert old, "B does not listen"
                # With a timeout, it returns once the backend is gone (true), not just told.
                ended = await admin.fetchval(
                    "SELECT bool_and(pg_terminate_backend(pid, 5000)) FROM unnest($1::int[]) pid",
                    old,
                )
                assert ended
                text = f"during the gap {attempt}"
                await alice.send_text(room, text)
                if not await admin.fetch(_LISTENERS, "kalandra-bus gap-B"):
                    return text
                await asyncio.sleep(1.5)
            raise AssertionError("no message was sequenced while B did not listen")

        text = await within(sent_while_b_deaf(), 60)
        got = await next_message(bob, lambda m: m.content.body == text, within=20)
        assert got.room_id == room
    finally:
        for c in clients:
            await c.close()
        for hub in hubs.values():
            await hub.stop()
        for store in stores:
            await store.close()
        await admin.close()
