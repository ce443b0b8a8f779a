"""ClusterNode's lease decisions on a MemoryStore whose clock (the database's) the test sets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from kalandra_core.proto import Frame, FrameHeader, Opcode, RawPayload
from kalandra_core.server import bus
from kalandra_core.server.bus import MemoryBus, MemoryNetwork
from kalandra_core.server.cluster import ClusterNode, RemoteSession
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


def _frame(request_id: int) -> Frame:
    header = FrameHeader(Opcode.APP_MESSAGE, request_id=request_id, room_id=7, sender_id=5)
    return Frame.build(header, RawPayload(b"x"))


def test_a_forward_after_one_never_taken_is_dropped_and_passing_on_keeps_the_chain() -> None:
    # "w" takes forwards from "o", and passes frames on to "x" (the room moved there).
    network = MemoryNetwork()
    heard: dict[str, list[bus.Forward]] = {"w": [], "x": []}
    config = ClusterConfig(enabled=True, node_name="w")
    node = ClusterNode(config, MemoryStore(), MemoryBus(network, "w"))

    def listener(name: str) -> Callable[[bytes], None]:
        return lambda body: heard[name].append(cast(bus.Forward, bus.decode(body)))

    for name in heard:
        network.handlers[name] = listener(name)

    def forward(forward_id: int, after: int, request_id: int) -> bus.Forward:
        return bus.Forward("o", 1, 5, 1, _frame(request_id).encode(), forward_id, after)

    first, lost, third = forward(11, 0, 1), forward(12, 11, 2), forward(13, 12, 3)
    assert node.take(first)
    assert not node.take(third)  # the forward before it (12) never came: not taken
    assert node.take(lost)  # (routed again, after the first: taken)

    # Passed on: the second names the forward the first was passed on with.
    for message in (first, lost):
        asker = RemoteSession(node.bus, "o", 1, 5, 1, message.forward_id, message.after)
        node.forward(asker, Frame.decode(message.frame), "x", 2, 0)
    one, two = heard["x"]
    assert (one.after, two.after) == (0, one.forward_id)
    assert one.forward_id not in (11, 12, 0)
