"""The simulation's trace and its store.

``Trace`` records one line per decision and observation, stamped with virtual time; a seed's
trace (and its digest) is the same on every run. ``SimStore`` is the ``MemoryStore`` with the
latency of a durable append and, rarely, a long fsync stall; in a cluster every node reaches it
(as all processes reach one PostgreSQL database), and ``view`` reads a room as stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Sequence

from simulation.sim_loop import VirtualTimeLoop

from kalandra_core.server.room import RoomSequencer
from kalandra_core.storage.base import LogEntry, RoomChanges, RoomState
from kalandra_core.storage.memory import MemoryStore


class Trace:
    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self.lines: list[str] = []

    def __call__(self, kind: str, *fields: object) -> None:
        self.lines.append(f"{self._loop.time():10.4f} {kind} " + " ".join(map(str, fields)))

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.lines).encode()).hexdigest()


class SimStore(MemoryStore):
    """MemoryStore with the latency of a durable append (and, rarely, a long fsync stall)."""

    def __init__(self, rng: random.Random, clock: Callable[[], float], stall: float) -> None:
        super().__init__(rng=random.Random(rng.getrandbits(64)), clock=clock)
        self._latency = random.Random(rng.getrandbits(64))
        self._stall = stall

    async def append(
        self,
        room_id: bytes,
        entries: Sequence[LogEntry],
        changes: RoomChanges | None = None,
        *,
        fence: int | None = None,
    ) -> None:
        delay = self._latency.uniform(0.0005, 0.004)
        if self._latency.random() < self._stall:
            delay += self._latency.uniform(0.3, 2.0)
        await asyncio.sleep(delay)
        await super().append(room_id, entries, changes, fence=fence)

    def lease(self, room_id: bytes) -> tuple[str, int] | None:
        """The room's lease as stored (owner, token), expired or not."""
        lease = self._leases.get(room_id)
        return None if lease is None else (lease.owner, lease.token)

    def view(self, room_id: bytes) -> RoomSequencer | None:
        """The room as stored, at once (the truth of a cluster, whose owner may change)."""
        stored = self._rooms.get(room_id)
        if stored is None:
            return None
        return RoomSequencer(RoomState(stored.room, dict(stored.members), dict(stored.bans)))
