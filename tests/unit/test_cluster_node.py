"""ClusterNode's lease decisions on a MemoryStore whose clock (the database's) the test sets."""

from __future__ import annotations

import asyncio

from kalandra_core.server.bus import MemoryBus, MemoryNetwork
from kalandra_core.server.cluster import ClusterNode
from kalandra_core.server.config import ClusterConfig
from kalandra_core.storage.memory import MemoryStore

ROOM = (7).to_bytes(16, "big")


def test_a_suspects_lease_taken_by_a_third_node_is_followed_at_once() -> None:
    # "me" suspects "dead" (its forwards went unanswered) and waits for its lease to run out;
    # meanwhile "other" takes the room. The frame must go to "other" now, not after the whole
    # wait (a lease term and a renewal: here far longer than the test allows).
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    config = ClusterConfig(enabled=True, node_name="me", lease_seconds=600.0, renew_seconds=600.0)
    node = ClusterNode(config, store, MemoryBus(MemoryNetwork(), "me"), monotonic=lambda: now[0])

    async def main() -> str | None:
        assert (await store.acquire_lease(ROOM, "dead", 10.0)).token == 1
        node.routes.suspect("dead", now[0])
        waiting = asyncio.create_task(node.live_holder(ROOM))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the suspect's lease is still running
        now[0] = 11.0  # it ran out; another node takes the room first
        assert (await store.acquire_lease(ROOM, "other", 10.0)).token == 2
        return await asyncio.wait_for(waiting, 5.0)

    assert asyncio.run(main()) == "other"
