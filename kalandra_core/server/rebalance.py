"""Rebalancing: live rooms spread over a cluster's processes; a process that joins gets its share.

Every ``rebalance_seconds`` a node marks itself alive in ``cluster_nodes`` (the database's
clock) and reads back the live nodes and how many rooms each holds. A node holding more than
its share (the rooms over the live nodes, rounded up; by more than a tenth of it, so that rooms
opened and closed do not keep rooms moving) hands rooms over to nodes below theirs, down to its
share; nodes at or below it do nothing, so the cluster settles. Which rooms go where is
decided by rendezvous hashing of the room id over the live nodes (:func:`plan`, sans-IO): no
coordination is needed, and a room that moved stays where it is when nodes come and go
elsewhere. Several nodes over their share fill the others' room in proportion to their excess,
so together they rarely overshoot it (what they do is put right at the next look).

The node list says only that a node renewed its row lately: one that died or was paused since
is listed for up to ``alive_for``. So the nodes a look would hand rooms to are first asked
over the bus whether they are there (``ClusterNode.answering``, a Probe and its Alive
answer); a node that does not answer within ``PROBE_WITHIN`` is left out and the plan made
again without it, and during a long series of handovers a taker is asked again every
``PROBE_FRESH`` seconds. A taker that dies between its answer and the handover is the case of
any owner that dies: its rooms are served again after a lease term.

A handover (``Hub.hand_over``) loses no frame: frames for the room wait on the giver, in
order, while its worker sequences and answers what it has; then the lease passes to the taker
in one statement that raises the fencing token, and the waiting frames follow it there. The
taker opens the room on the first frame it gets for it, or at its next look (``leases_of``),
whichever comes first; no lease term is waited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Protocol

from ..storage.base import Store, StoreError
from .config import ClusterConfig

log = logging.getLogger("kalandra.server.cluster")
MOVES_PER_LOOK = 64  # rooms one node hands over per look at most (a handover is quick)
PROBE_WITHIN = 1.0  # seconds a node has to answer "are you there?" before it is handed rooms
PROBE_FRESH = 1.0  # seconds an answer is trusted for; then the node is asked again


class Node(Protocol):
    """What rebalancing needs of the cluster node (ClusterNode)."""

    node: str
    store: Store
    config: ClusterConfig
    held: dict[bytes, int]

    async def answering(self, nodes: set[str], within: float) -> set[str]: ...


class Rebalancing(Protocol):
    """What rebalancing needs of the hub."""

    def held_rooms(self) -> list[bytes]: ...

    async def hand_over(self, room_id: bytes, to: str) -> bool: ...

    async def adopt(self, room_id: bytes) -> None: ...


def weight(room_id: bytes, node: str) -> int:
    digest = hashlib.blake2b(room_id + b"\0" + node.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(room_id: bytes, nodes: list[str]) -> list[str]:
    """The nodes in the room's order of preference (rendezvous hashing)."""
    return sorted(nodes, key=lambda n: (weight(room_id, n), n), reverse=True)


def plan(
    me: str, mine: list[bytes], counts: dict[str, int], limit: int = MOVES_PER_LOOK
) -> list[tuple[bytes, str]]:
    """Which of ``mine`` (the rooms this node holds) to hand over, and to whom, given the live
    nodes and the rooms each holds (``counts``)."""
    counts = dict(counts)
    counts[me] = len(mine)
    nodes = sorted(counts)
    if len(nodes) < 2:
        return []
    share = -(-sum(counts.values()) // len(nodes))
    excess = counts[me] - share
    if excess <= share // 10:  # a tenth over is tolerated: rooms come and go all the time
        return []
    over = sum(c - share for c in counts.values() if c > share)
    space = {n: -(-(share - c) * excess // over) for n, c in counts.items() if c < share}
    budget = min(excess, limit)
    moves: list[tuple[bytes, str]] = []
    ranked = [(room, ranking(room, nodes)) for room in sorted(mine)]
    # First the rooms that prefer a node with room to this one; then, if that is not enough,
    # any room, to the node with room it prefers most.
    for strict in (True, False):
        for room, order in ranked:
            if len(moves) >= budget:
                return moves
            if any(room == r for r, _ in moves):
                continue
            for node in order:
                if strict and node == me:
                    break
                if space.get(node, 0) > 0:
                    space[node] -= 1
                    moves.append((room, node))
                    break
    return moves


async def rebalance_loop(cluster: Node, hub: Rebalancing, monotonic: Callable[[], float]) -> None:
    config = cluster.config
    while True:
        try:
            await look(cluster, hub, monotonic)
        except StoreError as exc:
            log.warning("cluster: rebalancing failed: %s", exc)
        except Exception:  # a defect: said loudly, and the next look comes all the same
            log.exception("cluster: rebalancing failed")
        await asyncio.sleep(config.rebalance_seconds)


def alive_for(cluster: Node) -> float:
    # Past a look that comes late on a loaded machine; a node that died is given no rooms
    # once this has run out (one given before is served again after its lease term).
    return cluster.config.rebalance_seconds + cluster.config.lease_seconds


async def look(cluster: Node, hub: Rebalancing, monotonic: Callable[[], float]) -> None:
    """One look: say this node is alive, open the rooms handed to it, hand over its excess."""
    store, node = cluster.store, cluster.node
    counts = await store.node_alive(node, alive_for(cluster))
    for room_id in await store.leases_of(node):
        if room_id not in cluster.held:
            await hub.adopt(room_id)
    moves = plan(node, hub.held_rooms(), counts)
    targets = {to for _, to in moves}
    if not targets:
        return
    answered = await cluster.answering(targets, PROBE_WITHIN)
    if answered != targets:
        # Listed alive but silent: dead or paused since its row was renewed. Rooms handed to
        # it would wait for a failover; the plan is made again without it.
        silent = ", ".join(sorted(targets - answered))
        log.warning("cluster: %s listed alive but not answering: no rooms for it", silent)
        counts = {n: c for n, c in counts.items() if n not in targets - answered}
        moves = [(r, to) for r, to in plan(node, hub.held_rooms(), counts) if to in answered]
    asked_at = dict.fromkeys(answered, monotonic())
    for room_id, to in moves:
        if to not in asked_at:
            continue  # stopped answering during this look
        if monotonic() - asked_at[to] > PROBE_FRESH:  # a long series of handovers: ask again
            if not await cluster.answering({to}, PROBE_WITHIN):
                log.warning("cluster: %s stopped answering: no more rooms for it", to)
                del asked_at[to]
                continue
            asked_at[to] = monotonic()
        started = monotonic()
        if await hub.hand_over(room_id, to):
            log.info(
                "room %s: handed over to %s in %.1f ms",
                room_id.hex(),
                to,
                (monotonic() - started) * 1000,
            )
