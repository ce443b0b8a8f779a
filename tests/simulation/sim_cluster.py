"""Several server nodes in one simulation: a cluster sharing one store and one bus.

Each node is a real :class:`Hub` in cluster mode with its own :class:`ClusterNode`, as
``kalandra serve`` builds them, wired to the simulation through their own hooks only:

* the store: every node has a :class:`NodeStore`, its connection to the one shared store (one
  PostgreSQL database). Lease expiry is judged by the store's clock, the virtual wall time.
* the bus: a :class:`SimBus` (the real :class:`MemoryBus`, whose sends cross :class:`BusLinks`
  instead of being direct calls). PostgreSQL NOTIFY is reliable and in order per connection
  but may be delayed: a message between two nodes takes the network's latency plus its
  retransmission delays at the configured loss, in order per (sender, receiver). Rarely
  (``break_per_frame``, the network's reset rate) a listener's connection is reset and what is
  in flight to it is lost, as a NOTIFY is lost to a listener that reconnects; a second later
  (``PgBus``'s look at its connections), once the node reaches the database, it is told of the
  gap (``MemoryNetwork.gap``).
* clients: the network's balancer sends a client to its home node while that node is up, else
  to the next one up (a load balancer in front of the processes).
* rebalancing (``rebalance`` seconds between a node's looks): with ``SimConfig.join`` only the
  first node starts; the others join during the workload (``SimCluster.joins``) and live rooms
  are handed over to them while clients send, on top of the faults below.

Node faults (``SimCluster.faults``), one at a time, each on the node holding a room's lease
(the busy owner) or on another node:

* crash (kill -9): its connections are reset, its bus messages in flight are lost, its store
  calls never return (a write already at the database may still land), its leases stay until
  they expire on the store's clock; later a new process starts under the same name.
* pause (SIGSTOP) past the lease: its store calls, bus messages and connections wait at its
  :class:`NodeGate`; on resume they all go on, so writes it had under way reach the store with
  the old lease's token and must be refused (``Fenced``) if another node took the room.
* cut off from the database past the lease (``SimCluster.cuts``, in half the runs, from a
  generator of its own, overlapping the faults above): its clients still reach it, but its store
  calls wait at its link gate, bus messages to it are lost and its own wait in its outbox; on
  reconnecting its renewal finds the leases lost and its writes are fenced.

The :class:`Ledger` records every lease grant, every write that reached the store with its
token and node, and every refused one; ``check`` turns it into the cluster's properties.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from nacl.signing import SigningKey
from simulation.sim_net import NetProfile, NodeGate, Tracer
from simulation.sim_store import SimStore

from kalandra_core.server.bus import MemoryBus, MemoryNetwork
from kalandra_core.server.cluster import ClusterNode
from kalandra_core.server.config import ClusterConfig, Limits, ServerConfig
from kalandra_core.server.hub import Hub
from kalandra_core.storage.base import Fenced, LeaseGrant, Store
from kalandra_core.transport.interface import SessionFactory

_NOTICE = 1.0  # seconds until a node's bus notices its listener was reset (PgBus's watch)
WRITES = ("append", "redact", "put_welcome", "put_group_info")
LEASE_LOOKUPS = ("acquire_lease", "lease_owner")


@dataclass(frozen=True, slots=True)
class Timing:
    """The cluster's settings in a simulation (short, like the cluster tests')."""

    lease: float = 3.0
    renew: float = 1.0
    forward_timeout: float = 2.0
    rebalance: float = 1.0

    @property
    def failover_bound(self) -> float:
        """How long a crashed owner's room may stay unserved once its lease has run out (at
        most ``lease`` after the crash) and a live node looks for the room's owner: a route
        still cached for a second, a forward to the dead node unanswered for
        ``forward_timeout``, then a sweep, a lease poll and the taking."""
        return self.forward_timeout + 2.0


@dataclass(slots=True)
class Write:
    at: float
    room: bytes
    node: str
    what: str
    fence: int | None


@dataclass(slots=True)
class Crash:
    at: float
    node: str
    held: dict[bytes, int]  # room -> token of the leases the node held


@dataclass(slots=True)
class Ledger:
    grants: list[tuple[float, bytes, str, int]] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    fenced: list[Write] = field(default_factory=list)
    lookups: dict[bytes, list[tuple[float, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    crashes: list[Crash] = field(default_factory=list)
    pauses: int = 0
    paused_during: list[tuple[float, float]] = field(default_factory=list)
    # (node, from, until, rooms it held) of each cut from the database
    cuts: list[tuple[str, float, float, list[bytes]]] = field(default_factory=list)
    # A node to pause at its next write (the stop lands while a commit is under way).
    pause_at_write: NodeGate | None = None
    paused: list[str] = field(default_factory=list)  # who was paused at a write, when
    handovers: list[tuple[float, bytes, str, str]] = field(default_factory=list)  # from, to


class NodeStore:
    """One node's connection to the shared store. Every call waits while the node is paused,
    before it reaches the store and again before the node sees the answer; once the node
    crashed, its calls never return."""

    def __init__(
        self,
        store: SimStore,
        gate: NodeGate,
        link: NodeGate,
        ledger: Ledger,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._gate = gate
        self._link = link
        self._ledger = ledger
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(target):
            return target
        node = self._gate.node

        async def call(*args: Any, **kw: Any) -> Any:
            await self._gate.wait()
            await self._link.wait()
            if name in WRITES and self._ledger.pause_at_write is self._gate:
                self._ledger.pause_at_write = None
                self._ledger.paused.append(f"{node} at its {name} at {self._clock():.3f}")
                self._gate.pause()
                await self._gate.wait()
            if name in LEASE_LOOKUPS:
                self._ledger.lookups[args[0]].append((self._clock(), node))
            try:
                result = await target(*args, **kw)
            except Fenced:
                self._ledger.fenced.append(
                    Write(self._clock(), args[0], node, name, kw.get("fence"))
                )
                raise
            if name in WRITES:
                self._ledger.writes.append(
                    Write(self._clock(), args[0], node, name, kw.get("fence"))
                )
            elif isinstance(result, LeaseGrant) and result.token is not None:
                self._ledger.grants.append((self._clock(), args[0], node, result.token))
            elif name == "hand_over_lease" and result:
                room, _, token, to = args[:4]
                self._ledger.grants.append((self._clock(), room, to, token + 1))
                self._ledger.handovers.append((self._clock(), room, node, to))
            await self._link.wait()
            await self._gate.wait()
            return result

        return call


class BusLinks:
    """The bus's node-to-node links on virtual time (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        profile: Callable[[], NetProfile],
        trace: Tracer,
    ) -> None:
        self.network = MemoryNetwork()
        self.gates: dict[str, NodeGate] = {}
        self.reach: dict[str, NodeGate] = {}  # each node's link to the database
        self._loop = loop
        self._rng = rng
        self._profile = profile
        self._trace = trace
        self._last: dict[tuple[str, str], float] = {}
        self._generation: dict[str, int] = defaultdict(int)  # of each listener's connection
        self._dead: set[tuple[str, int]] = set()  # generations that ended with their process
        self.messages = 0
        self.lost = 0

    def reset(self, node: str, why: str) -> None:
        """The node's listening connection is gone: what is in flight to it is lost. The node
        learns of the gap when it listens again (a paused or cut-off node: once it runs and
        reaches the database)."""
        self._generation[node] += 1
        self._trace("bus-reset", node, why)
        self._loop.call_later(_NOTICE, self._gap, node)

    def _gap(self, node: str) -> None:
        gate, link = self.gates.get(node), self.reach.get(node)
        if gate is not None and link is not None:
            gate.run(lambda: link.run(lambda: self._told(node)))

    def _told(self, node: str) -> None:
        self._trace("bus-gap", node)
        self.network.gap(node)

    def died(self, node: str) -> None:
        """The node's process died: what is in flight to it goes nowhere (not a loss the
        cluster has to recover from in order: the sender's forwards to it are overdue)."""
        self._dead.add((node, self._generation[node]))
        self._generation[node] += 1

    def transmit(self, source: str, target: str, body: bytes) -> None:
        p = self._profile()
        rng = self._rng
        self.messages += 1
        delay, rto, tries = rng.uniform(*p.latency), p.rto, 0
        while rng.random() < p.loss and tries < p.max_retransmits:
            tries += 1
            delay += rto
            rto *= 2
        if rng.random() < p.break_per_frame:
            self.reset(target, f"from {source}")
        key = (source, target)
        at = max(self._loop.time() + delay, self._last.get(key, 0.0) + 1e-6)
        self._last[key] = at
        generation = self._generation[target]
        self._loop.call_at(at, self._arrive, target, body, generation)

    def _arrive(self, target: str, body: bytes, generation: int) -> None:
        gate = self.gates.get(target)
        link = self.reach.get(target)
        if (target, generation) in self._dead or gate is None or gate.state == "crashed":
            return
        if generation != self._generation[target] or link is None or not link.up:
            self._lose(body)  # a listener reset or cut off from the database loses it
            return
        gate.run(lambda: self._hand(target, body, generation))

    def _hand(self, target: str, body: bytes, generation: int) -> None:
        handler = self.network.handlers.get(target)
        if generation != self._generation[target] or handler is None:
            self._lose(body)
            return
        handler(body)

    def _lose(self, body: bytes) -> None:
        self.lost += 1


class SimBus(MemoryBus):
    """The real in-memory bus; its sends cross :class:`BusLinks` (and wait while paused)."""

    def __init__(self, links: BusLinks, gate: NodeGate, link: NodeGate) -> None:
        super().__init__(links.network, gate.node)
        self._links = links
        self._gate = gate
        self._link = link

    def send(self, target: str, body: bytes) -> None:
        # Cut off from the database, its sends wait in its outbox until the link is back.
        transmit = lambda: self._links.transmit(self.node, target, body)  # noqa: E731
        self._gate.run(lambda: self._link.run(transmit))


@dataclass(slots=True)
class SimNode:
    name: str
    gate: NodeGate
    link: NodeGate  # its connections to the database (store and bus)
    hub: Hub
    cluster: ClusterNode


class SimCluster:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        store: SimStore,
        limits: Limits,
        server_key: SigningKey,
        trace: Tracer,
        count: int,
        profile: Callable[[], NetProfile],
        clock: Callable[[], float],
        timing: Timing = Timing(),
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.more = random.Random(repr(rng.getstate()[1][:4]))
        self.joining = random.Random(repr(rng.getstate()[1][4:8]))  # its own: see cuts
        self.started: set[str] = set()
        self.store = store
        self.limits = limits
        self.server_key = server_key  # one key for the deployment, as every process reads it
        self.trace = trace
        self.timing = timing
        self.clock = clock
        self.ledger = Ledger()
        self.links = BusLinks(loop, random.Random(rng.getrandbits(64)), profile, trace)
        self.names = [f"n{i + 1}" for i in range(count)]
        self.nodes: dict[str, SimNode] = {}
        self.zombies: list[SimNode] = []  # crashed processes: their tasks hang, unseen
        self.crash_net: Callable[[str], None] = lambda _node: None  # the network's crash_node

    def _make(self, name: str) -> SimNode:
        gate = NodeGate(self.loop, name)
        link = NodeGate(self.loop, name)
        t = self.timing
        config = ServerConfig(
            limits=self.limits,
            cluster=ClusterConfig(
                enabled=True,
                node_name=name,
                lease_seconds=t.lease,
                renew_seconds=t.renew,
                forward_timeout=t.forward_timeout,
                rebalance_seconds=t.rebalance,
            ),
        )
        store = cast(Store, NodeStore(self.store, gate, link, self.ledger, self.loop.time))
        node = ClusterNode(
            config.cluster, store, SimBus(self.links, gate, link), monotonic=self.loop.time
        )
        hub = Hub(
            store,
            config,
            self.server_key,
            clock=self.clock,
            monotonic=self.loop.time,
            cluster=node,
        )
        return SimNode(name, gate, link, hub, node)

    async def start(self, name: str) -> None:
        node = self._make(name)
        self.nodes[name] = node
        self.links.gates[name] = node.gate
        self.links.reach[name] = node.link
        node.hub.start()
        await node.hub.start_cluster()
        self.started.add(name)
        self.trace("node-start", name)

    async def start_all(self, count: int | None = None) -> None:
        for name in self.names[:count]:
            await self.start(name)

    async def joins(self, duration: float) -> None:
        """The nodes not started yet join one by one within the first half of ``duration``."""
        rng = self.joining
        for name in self.names:
            if name not in self.started:
                await asyncio.sleep(rng.uniform(1.0, duration / 4))
                self.trace("node-join", name)
                await self.start(name)

    async def stop(self) -> None:
        for node in self.nodes.values():
            if node.gate.up and node.link.up:
                await node.hub.stop()

    # --- clients ------------------------------------------------------------------------------

    def balancer(self, home: Callable[[str], int]) -> Any:
        def pick(client: str) -> tuple[str, SessionFactory, NodeGate] | None:
            first = home(client) % len(self.names)
            for i in range(len(self.names)):
                node = self.nodes.get(self.names[(first + i) % len(self.names)])
                if node is not None and node.gate.up:
                    return node.name, node.hub.session_factory, node.gate
            return None

        return pick

    def owner(self, room_id: bytes) -> str | None:
        holders = [n.name for n in self.nodes.values() if room_id in n.cluster.held]
        return holders[0] if holders else None

    # --- faults -------------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        node = self.nodes.pop(name)
        # What it really held: a node cut off from the database may not know it lost a lease.
        held = {r: t for r, t in node.cluster.held.items() if self.store.lease(r) == (name, t)}
        self.ledger.crashes.append(Crash(self.loop.time(), name, held))
        self.trace("node-crash", name, "held", len(held))
        node.gate.crash()
        node.link.crash()
        self.zombies.append(node)
        self.links.network.handlers.pop(name, None)
        self.links.network.gap_handlers.pop(name, None)
        self.links.died(name)
        self.crash_net(name)

    def pause(self, name: str) -> None:
        self.ledger.pauses += 1
        self.ledger.paused_during.append((self.loop.time(), float("inf")))
        self.trace("node-pause", name, "held", len(self.nodes[name].cluster.held))
        self.nodes[name].gate.pause()

    def cut(self, name: str) -> None:
        """The node loses the database (store and bus); its clients still reach it."""
        held = sorted(self.nodes[name].cluster.held)
        self.ledger.cuts.append((name, self.loop.time(), float("inf"), held))
        self.trace("node-cut", name, "held", len(held))
        self.links.reset(name, "cut off")
        self.nodes[name].link.pause()

    def resume(self, name: str) -> None:
        start, _ = self.ledger.paused_during[-1]
        self.ledger.paused_during[-1] = (start, self.loop.time())
        self.trace("node-resume", name)
        self.nodes[name].gate.resume()

    async def faults(self, duration: float, rooms: list[bytes]) -> None:
        """One to two node faults, one at a time, within ``duration`` virtual seconds."""
        rng = self.rng
        end = self.loop.time() + duration
        for _ in range(rng.randint(1, 2)):
            await asyncio.sleep(rng.uniform(2.0, max(2.0, (end - self.loop.time()) / 2)))
            owners = [o for o in (self.owner(r) for r in rooms) if o is not None]
            victim = rng.choice(sorted(owners) if owners else sorted(self.nodes))
            t = self.timing
            if rng.random() < 0.5:
                self.crash(victim)
                await asyncio.sleep(rng.uniform(2 * t.lease, 4 * t.lease))
                await self.start(victim)
            else:
                # Stopped as it writes if it writes soon (then its write must be fenced),
                # else wherever it is.
                gate = self.nodes[victim].gate
                self.ledger.pause_at_write = gate
                for _ in range(20):
                    await asyncio.sleep(0.1)
                    if not gate.up:
                        break
                self.ledger.pause_at_write = None
                self.pause(victim)
                await asyncio.sleep(t.lease + rng.uniform(0.5, 3.0))
                self.resume(victim)

    async def cuts(self, duration: float, rooms: list[bytes]) -> None:
        """In half the runs, meanwhile, an owner cut off from the database past its lease (its
        own generator: with cuts or without, a seed's other faults are drawn alike)."""
        rng = self.more
        if rng.random() < 0.5:
            return
        await asyncio.sleep(rng.uniform(2.0, duration * 0.6))
        owners = [o for o in (self.owner(r) for r in rooms) if o is not None]
        candidates = sorted(owners) if owners else sorted(self.nodes)
        if not candidates:
            return  # every node is down (crashed, not started again yet): none to cut off
        victim = rng.choice(candidates)
        node = self.nodes.get(victim)
        if node is None:
            return
        self.cut(victim)
        await asyncio.sleep(self.timing.lease + rng.uniform(0.5, 3.0))
        self.trace("node-reconnect", victim)
        name, start, _, held = self.ledger.cuts[-1]
        self.ledger.cuts[-1] = (name, start, self.loop.time(), held)
        node.link.resume()  # (a process that crashed meanwhile stays dead: its gate is shut)


# --- properties -----------------------------------------------------------------------------


def check(cluster: SimCluster, label: Callable[[bytes], str], v: dict[str, list[str]]) -> None:
    ledger = cluster.ledger
    owner_of = {(room, token): node for _, room, node, token in ledger.grants}
    last_token: dict[bytes, int] = {}
    for w in ledger.writes:
        name = label(w.room)
        if w.fence is None:
            if w.what == "append":
                v["single_writer"].append(f"{name}: {w.node} appended unfenced at {w.at:.3f}")
            continue
        granted = owner_of.get((w.room, w.fence))
        if granted != w.node:
            v["single_writer"].append(
                f"{name}: {w.node}'s {w.what} at {w.at:.3f} with token {w.fence}, "
                f"granted to {granted}"
            )
        if w.fence < last_token.get(w.room, 0):
            v["single_writer"].append(
                f"{name}: {w.node}'s {w.what} at {w.at:.3f} with stale token {w.fence} "
                f"after token {last_token[w.room]} wrote"
            )
        last_token[w.room] = max(last_token.get(w.room, 0), w.fence)

    bound = cluster.timing.failover_bound
    expiry = cluster.timing.lease
    for crash in ledger.crashes:
        for room in sorted(crash.held):
            # The first time a live node looked for the room's owner once the dead node's
            # lease had surely run out (an earlier asker's session may have gone since).
            demand = next(
                (at for at, _ in ledger.lookups.get(room, []) if at >= crash.at + expiry), None
            )
            if demand is None:
                continue  # nobody asked for the room again
            start = demand
            grant = next(
                (at for at, r, _, _ in ledger.grants if r == room and at >= crash.at), None
            )
            # Not claimed while another node is paused or cut off too: the frames asking for
            # the room may be the ones waiting there.
            until = start + bound if grant is None else grant
            others = ledger.paused_during + [(a, b) for _, a, b, _ in ledger.cuts]
            if any(a <= until and crash.at <= b for a, b in others):
                continue
            if grant is None or grant - start > bound:
                after = "never" if grant is None else f"{grant - start:.2f} s"
                v["failover_in_lease"].append(
                    f"{label(room)}: {crash.node} crashed at {crash.at:.2f}, asked after its "
                    f"lease at {demand:.2f}, served again {after} (bound {bound:.1f} s)"
                )


def taken_during_cuts(cluster: SimCluster) -> int:
    """Rooms another node took while their owner was cut off from the database."""
    return sum(
        1
        for name, start, end, held in cluster.ledger.cuts
        for room in held
        if any(
            r == room and n != name and start <= at <= end for at, r, n, _ in cluster.ledger.grants
        )
    )


def failover_times(cluster: SimCluster) -> list[float]:
    """Seconds from each crash of an owner until its rooms' leases were granted again."""
    out = []
    for crash in cluster.ledger.crashes:
        for room in sorted(crash.held):
            grant = next(
                (at for at, r, _, _ in cluster.ledger.grants if r == room and at >= crash.at),
                None,
            )
            if grant is not None:
                out.append(round(grant - crash.at, 2))
    return out
