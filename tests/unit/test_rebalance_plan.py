"""Rebalancing's plan (which rooms a node hands over, and to whom) and the store's handover."""

from __future__ import annotations

import asyncio
from collections import Counter

from kalandra_core.server.rebalance import plan, ranking
from kalandra_core.storage.memory import MemoryStore

ROOMS = [i.to_bytes(16, "big") for i in range(1, 61)]


def test_a_balanced_cluster_moves_nothing() -> None:
    assert plan("a", ROOMS[:20], {"a": 20, "b": 20, "c": 20}) == []
    assert plan("a", ROOMS[:21], {"a": 21, "b": 20, "c": 20}) == []  # within the rounding
    assert plan("a", ROOMS[:22], {"a": 22, "b": 20, "c": 18}) == []  # within a tenth
    assert len(plan("a", ROOMS[:3], {"a": 3, "b": 3, "c": 0})) == 1  # no tolerance when small
    assert plan("a", ROOMS[:5], {"a": 5}) == []  # alone


def test_a_new_node_gets_its_share_from_each() -> None:
    counts = {"a": 30, "b": 30, "c": 0}
    a = plan("a", ROOMS[:30], counts)
    b = plan("b", ROOMS[30:], counts)
    assert len(a) == len(b) == 10
    assert {to for _, to in a + b} == {"c"}
    assert plan("c", [], counts) == []


def test_one_node_spreads_its_rooms_over_new_ones_by_preference() -> None:
    moves = plan("a", ROOMS, {"a": 60, "b": 0, "c": 0})
    assert Counter(to for _, to in moves) == {"b": 20, "c": 20}
    # Each room moved goes to the node it prefers over "a", where there was room for it.
    preferred = sum(1 for room, to in moves if ranking(room, ["a", "b", "c"])[0] == to)
    assert preferred >= 30
    assert moves == plan("a", ROOMS, {"a": 60, "b": 0, "c": 0})  # no coordination: stable


def test_several_nodes_over_their_share_do_not_overfill_the_new_one() -> None:
    counts = {"a": 20, "b": 20, "c": 20, "d": 0}
    given = sum(len(plan(n, ROOMS[i * 20 : i * 20 + 20], counts)) for i, n in enumerate("abc"))
    assert given == 15  # the share of 60 rooms over 4 nodes


def test_the_limit_caps_one_look() -> None:
    assert len(plan("a", ROOMS, {"a": 60, "b": 0}, limit=7)) == 7


def test_a_lease_is_handed_over_only_to_a_live_node_with_a_new_token() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    room = ROOMS[0]

    async def main() -> None:
        token = (await store.acquire_lease(room, "a", 10.0)).token
        assert token == 1
        assert not await store.hand_over_lease(room, "a", token, "b", 10.0)  # b not alive
        assert set(await store.node_alive("b", 5.0)) == {"b"}
        assert not await store.hand_over_lease(room, "a", token + 1, "b", 10.0)  # stale token
        assert await store.hand_over_lease(room, "a", token, "b", 10.0)
        assert await store.lease_owner(room) == "b"
        assert await store.leases_of("b") == [room]
        assert await store.node_alive("a", 5.0) == {"a": 0, "b": 1}
        assert (await store.acquire_lease(room, "b", 10.0)).token == 3  # tokens only grow
        now[0] += 6.0  # b's presence ran out (a's was renewed above)
        assert set(await store.node_alive("a", 5.0)) == {"a"}

    asyncio.run(main())
