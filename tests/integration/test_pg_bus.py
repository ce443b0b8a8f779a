"""The cluster's bus on real PostgreSQL: order, bodies over NOTIFY's limit, broadcasts, and a
connection the database drops."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers.native import within

from kalandra_core.server.pg_bus import PgBus
from kalandra_core.storage.sql import SqlStore

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
