"""One seeded simulation run: the real server (``Hub`` on a ``MemoryStore``) and real clients
(``kalandra_core.client.driver.Client`` over ``ClientCore``) on the in-memory network of
``sim_net``, all on the virtual-time loop of ``sim_loop``; a random workload; then the
properties. With ``SimConfig(nodes=3)`` the server is a cluster of real hubs on one store and
one bus (``sim_cluster``), clients spread over the nodes, and the workload adds node faults;
the server-side truth is then the store's.

How the real code is wired to the simulation, through its own hooks only: each driver gets
``Client(..., connector=..., clock=...)`` pointing at the simulated network (the client's
address names it in the host part) and the virtual wall time; the ``Hub`` gets the virtual
clocks (``clock=`` wall time, ``monotonic=`` for timeouts and rate limits); each ``ClientCore``
its seeded ``first_request_id``. Nothing inside a
module is patched. ``SimClient`` only adds recording on top of ``Client._handle``; every effect
is the real driver's.

Phases of a run (all virtual time):

1. setup on a clean network: accounts, KeyPackages, one or two rooms, initial members;
2. workload at the configured loss: sends, adds, removes, self-updates, concurrent commits by
   two members, partitions of a client while the others commit (then heal); in a cluster, one
   or two node faults (a crash, then a restart; a pause past the lease, then resume) and, in
   half the runs, a node cut off from the database past its lease;
3. settle: no more workload, every partition healed, the network keeps its loss; wait until
   every client is caught up (or a virtual time limit passes);
4. properties (``check``), each with its violations spelled out.

The run writes a trace (one line per decision and observation, no secrets, no random bytes);
the same seed gives the same trace, and its digest is part of the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

from nacl.signing import SigningKey
from simulation import sim_cluster
from simulation.sim_loop import VirtualTimeLoop, run_virtual
from simulation.sim_net import NetProfile, SimNetwork
from simulation.sim_store import SimStore, Trace

from kalandra_core.client import core as client_core
from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ClientError, ServerAddress
from kalandra_core.mls.errors import MlsError
from kalandra_core.proto import Frame, Opcode
from kalandra_core.server.config import Limits, ServerConfig
from kalandra_core.server.hub import Hub
from kalandra_core.server.room import RoomSequencer

PROPERTIES = (
    "converged",  # every server-side member: same epoch, authenticator, sender keys, log end
    "acked_stored_once",  # an acknowledged message is in the store log exactly once, at its index
    "no_duplicate_sequencing",  # no (sender, request id) is sequenced twice
    "acked_delivered_once",  # every member in the room at its index got it exactly once
    "no_double_delivery",  # no application got a log index (or a message body) twice
    "dense_log",  # store log dense from 0; clients applied it in order
    "partitioned_recovers",  # a client partitioned while others committed converges after heal
    "removed_members_notice",  # a member the server removed does not believe it is still in
    "requests_resolve",  # every request ends acknowledged or failed (the outbox drains)
    # A client's acknowledged messages in a room are sequenced in the order of its send calls.
    # Not claimed under a rate limit on a lossy network: a frame delayed in the stream past the
    # server's retry_after can be taken while one sent before it was refused. In a cluster also
    # across failovers, fenced batches and forwards the bus lost.
    "sends_in_order",
    "no_unexpected_errors",  # no exception escaped an operation; the server logged no error
    # Several nodes (sim_cluster): every write reached the store under the lease token granted
    # to its node, never one older than a token that already wrote (a paused owner is fenced).
    "single_writer",
    # A crashed owner's rooms are served again within the lease (and the forward timeout).
    "failover_in_lease",
)


@dataclass(frozen=True, slots=True)
class SimConfig:
    seed: int
    loss: float = 0.0
    clients: int | None = None  # None: 3..5, from the seed
    rooms: int | None = None  # None: 1..2, from the seed
    workload: float = 30.0  # virtual seconds of workload
    settle_limit: float = 400.0  # virtual seconds allowed to converge afterwards
    partitions: bool = True
    store_stall: float = 0.02  # share of appends that stall (a slow fsync)
    # The server's per-session rate limit (frames/s, burst); None: the production default.
    rate_limit: tuple[float, int] | None = None
    burst_sends: int = 0  # > 0: some sends are a burst of this many messages at once
    nodes: int = 1  # > 1: a cluster of server nodes on one store (sim_cluster), with node faults
    cuts: bool = True  # in a cluster: nodes may also be cut off from the database for a while
    join: bool = False  # in a cluster: one node starts; the others join during the workload


@dataclass(slots=True)
class Sent:
    client: str
    room: str
    request_id: int
    body: str


@dataclass(slots=True)
class Interval:
    """A client's membership of a room as the client lived it: log indexes (anchor, left)."""

    anchor: int | None = None  # log index of the commit that added us (-1 for the creator)
    left: int | None = None  # log index of the commit/moderation that removed us


@dataclass(slots=True)
class Partition:
    client: str
    start: float
    end: float = 0.0
    epochs_before: dict[str, int] = field(default_factory=dict)
    epochs_after: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Result:
    config: SimConfig
    violations: dict[str, list[str]]
    digest: str
    trace: list[str]
    stats: dict[str, Any]
    real_seconds: float

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def failed(self) -> list[str]:
        return [name for name in PROPERTIES if self.violations.get(name)]

    def report(self, excerpt: int = 40) -> str:
        lines = [
            f"seed {self.config.seed} loss {self.config.loss:.0%}: "
            + ("ok" if self.ok else "FAILED " + ", ".join(self.failed()))
        ]
        for name in self.failed():
            found = self.violations[name]
            lines.append(f"  {name}: {len(found)} violation(s)")
            lines += [f"    {v}" for v in found[:6]]
        lines.append(f"  stats: {self.stats}")
        if not self.ok and excerpt:
            lines.append(f"  trace (last {excerpt} of {len(self.trace)} lines):")
            lines += [f"    {line}" for line in self.trace[-excerpt:]]
        return "\n".join(lines)


class SimClient(Client):
    """The real driver; ``_handle`` also records what the application is told."""

    def __init__(self, world: World, name: str, core: ClientCore, token: str) -> None:
        super().__init__(
            core,
            ServerAddress("tcp", name, 1),
            token,
            request_timeout=15.0,
            connector=world.net.connector(),
            clock=world.loop.wall,
        )
        self.world = world
        self.name = name
        self.received: list[tuple[str, int, int, str]] = []  # room, log index, sender, body
        self.acked: dict[int, tuple[str, int | None]] = {}  # request id -> room, log index
        self.intervals: dict[str, list[Interval]] = defaultdict(list)
        self.undecryptable: list[str] = []
        self.commit_busy = False

    @property
    def member_id(self) -> int:
        return self.core.member_id

    def is_active(self, room_id: bytes) -> bool:
        room = self.core.rooms.get(room_id)
        return room is not None and room.active and room.anchored

    def _handle(self, events: list[ev.Event]) -> None:
        w = self.world
        for event in events:
            if isinstance(event, ev.Message):
                label = w.label(event.room_id)
                self.received.append((label, event.log_index, event.sender_id, event.content.body))
                w.trace("recv", self.name, label, event.log_index, event.content.body)
            elif isinstance(event, ev.Acked):
                label = w.label(event.room_id)
                self.acked[event.request_id] = (label, event.log_index)
                sent = w.sent.get((self.name, event.request_id))
                what = sent.body if sent is not None else "commit"
                w.trace("acked", self.name, label, event.log_index, what)
            elif isinstance(event, ev.Failed):
                w.trace("failed", self.name, w.label(event.room_id), event.code, event.message)
            elif isinstance(event, ev.EpochChanged):
                w.trace("epoch", self.name, w.label(event.room_id), event.epoch)
            elif isinstance(event, ev.Joined):
                self.intervals[w.label(event.room_id)].append(Interval())
                w.trace("joined", self.name, w.label(event.room_id), event.epoch)
            elif isinstance(event, ev.Left):
                label = w.label(event.room_id)
                room = self.core.rooms.get(event.room_id)
                if self.intervals[label] and room is not None:
                    self.intervals[label][-1].left = room.last_seen
                w.trace("left", self.name, label, event.reason)
            elif isinstance(event, ev.Undecryptable):
                label = w.label(event.room_id)
                self.undecryptable.append(f"{label}@{event.log_index}: {event.reason}")
                w.trace("undecryptable", self.name, label, event.log_index, event.reason)
        super()._handle(events)
        for room_id, room in self.core.rooms.items():
            spans = self.intervals.get(w.label(room_id))
            if spans and spans[-1].anchor is None and room.anchored:
                spans[-1].anchor = room.last_seen
                w.trace("anchored", self.name, w.label(room_id), room.last_seen)


class World:
    def __init__(self, config: SimConfig, loop: VirtualTimeLoop) -> None:
        self.config = config
        self.loop = loop
        self.rng = random.Random(config.seed)
        random.seed(self.rng.getrandbits(64))  # the driver's reconnect jitter
        self.trace = Trace(loop)
        self.store = SimStore(self.rng, loop.wall, config.store_stall)
        limits = Limits(idle_timeout=120.0)
        if config.rate_limit is not None:
            limits.rate_per_second, limits.rate_burst = config.rate_limit
        server_key = SigningKey(self.rng.randbytes(32))
        self.hub = Hub(
            self.store,
            ServerConfig(limits=limits),
            server_key,
            clock=loop.wall,
            monotonic=loop.time,
        )
        self.net = SimNetwork(
            loop,
            random.Random(self.rng.getrandbits(64)),
            NetProfile(),
            self.hub.session_factory,
            self.trace,
        )
        self.cluster: sim_cluster.SimCluster | None = None
        if config.nodes > 1:  # the single hub above stays unused (and unstarted)
            self.cluster = sim_cluster.SimCluster(
                loop,
                random.Random(self.rng.getrandbits(64)),
                self.store,
                limits,
                server_key,
                self.trace,
                config.nodes,
                lambda: self.net.profile,
                loop.wall,
            )
            self.net.balancer = self.cluster.balancer("abcde".index)
            self.cluster.crash_net = self.net.crash_node
        self.clients: list[SimClient] = []
        self.rooms: dict[bytes, str] = {}
        self.sent: dict[tuple[str, int], Sent] = {}
        self.partitions: list[Partition] = []
        self.unexpected: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._bodies = 0

    def label(self, room_id: bytes) -> str:
        return self.rooms.get(room_id, "?")

    def room_id(self, label: str) -> bytes:
        return next(rid for rid, name in self.rooms.items() if name == label)

    # --- server-side truth ------------------------------------------------------------------

    def server_view(self, room_id: bytes) -> RoomSequencer | None:
        if self.cluster is not None:
            return self.store.view(room_id)
        worker = self.hub.rooms.get(room_id)
        return None if worker is None else worker.sequencer

    def server_members(self, room_id: bytes) -> set[int]:
        view = self.server_view(room_id)
        return set() if view is None else set(view.active_members())

    def server_epoch(self, room_id: bytes) -> int:
        view = self.server_view(room_id)
        return -1 if view is None else view.epoch

    def server_next(self, room_id: bytes) -> int:
        view = self.server_view(room_id)
        return 0 if view is None else view.next_log_index

    def by_member(self, member_id: int) -> SimClient | None:
        return next((c for c in self.clients if c.member_id == member_id), None)

    # --- setup --------------------------------------------------------------------------------

    async def setup(self) -> None:
        cfg = self.config
        n_clients = cfg.clients or self.rng.randint(3, 5)
        n_rooms = cfg.rooms or self.rng.randint(1, 2)
        self.trace("setup", n_clients, "clients", n_rooms, "rooms", f"loss={cfg.loss}")
        for i in range(n_clients):
            name = "abcde"[i]
            account = await self.store.create_member(name)
            token = await self.store.issue_token(account.member_id)
            core = ClientCore(
                account.member_id,
                self.rng.randbytes(32),
                first_request_id=self.rng.randrange(1, 1 << 31),  # seeded request ids
            )
            client = SimClient(self, name, core, token)
            self.clients.append(client)
            await client.connect()
            await client.publish_key_packages(8)
        c = self.clients
        plans = [("A", c[0], c[1 : n_clients - 1])]
        if n_rooms == 2:
            plans.append(("B", c[1], [c[2]]))
        # Room ids from the seed (their own generator: the other draws stay as they were), as
        # a cluster's rebalancing hashes them to pick the rooms' nodes.
        ids = random.Random(f"room ids {cfg.seed}")
        for label, creator, members in plans:
            with mock.patch.object(client_core, "os", SimpleNamespace(urandom=ids.randbytes)):
                room_id = await creator.create_room(name=label)
            self.rooms[room_id] = label
            creator.intervals[label].append(Interval(anchor=-1))
            for member in members:
                await creator.invite(room_id, [member.member_id])
                got = await asyncio.wait_for(member.joined.get(), 30)
                assert got == room_id
                await member.settle()
        self.trace("setup-done")

    # --- workload ----------------------------------------------------------------------------

    def _guard(self, what: str, client: SimClient, aw: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                result = await aw
                self.trace("ok", what, client.name, result)
            except (ClientError, TimeoutError) as exc:
                code = exc.code if isinstance(exc, ClientError) else 0
                self.trace("err", what, client.name, type(exc).__name__, hex(code))
            except KeyError as exc:  # not (or no longer) in the room
                self.trace("err", what, client.name, "KeyError", exc)
            except MlsError as exc:  # the actor's group refuses to build it (its view lags)
                self.trace("err", what, client.name, type(exc).__name__, exc)
            except Exception as exc:
                self.unexpected.append(f"{what} by {client.name}: {type(exc).__name__}: {exc}")
                self.trace("unexpected", what, client.name, type(exc).__name__)

        self.tasks.append(asyncio.create_task(run()))

    def _send(self, client: SimClient, room_id: bytes) -> None:
        self._bodies += 1
        label = self.label(room_id)
        body = f"{client.name}{self._bodies}"
        rid, data = client.core.send_message(room_id, Content(body=body), now=client.clock())
        self.sent[(client.name, rid)] = Sent(client.name, label, rid, body)
        self.trace("send", client.name, label, body)
        self._guard(f"send {body}", client, client.request(rid, data))

    def _can_commit(self, client: SimClient, room_id: bytes) -> bool:
        """One commit at a time per client: the driver does not guard against a second commit
        while the first is still pending (it would replace the MLS pending commit)."""
        if not client.is_active(room_id) or client.commit_busy:
            return False
        if client.core.rooms[room_id].group.has_pending_commit:
            return False
        return not any(
            p.room_id == room_id and p.kind != "message" for p in client.core.outbox.values()
        )

    def _commit(self, what: str, client: SimClient, room_id: bytes, aw: Awaitable[int]) -> None:
        client.commit_busy = True

        async def run() -> int:
            try:
                return await aw
            finally:
                client.commit_busy = False

        self.trace("commit", what, client.name, self.label(room_id))
        self._guard(f"{what} {self.label(room_id)}", client, run())

    def _members_of(self, room_id: bytes) -> list[SimClient]:
        return [c for c in self.clients if c.is_active(room_id)]

    def step(self) -> None:
        rng = self.rng
        room_id = rng.choice(sorted(self.rooms, key=self.label))
        active = self._members_of(room_id)
        if not active:
            return
        actor = rng.choice(active)
        roll = rng.random()
        if roll < 0.62:
            many = self.config.burst_sends if self.config.burst_sends and roll < 0.06 else 1
            for _ in range(many):
                self._send(actor, room_id)
        elif roll < 0.72:
            if self._can_commit(actor, room_id):
                self._commit("update", actor, room_id, actor.self_update(room_id))
        elif roll < 0.78:
            pair = [c for c in active if self._can_commit(c, room_id)]
            if len(pair) >= 2:
                for c in rng.sample(pair, 2):  # two commits for the same epoch: one loses
                    self._commit("update", c, room_id, c.self_update(room_id))
        elif roll < 0.86:
            members = self.server_members(room_id)
            if not actor.is_active(room_id):
                return
            roster = actor.core.rooms[room_id].roster()
            outside = [
                c for c in self.clients if c.member_id not in members and c.member_id not in roster
            ]
            if outside and self._can_commit(actor, room_id):
                target = rng.choice(outside)
                self._commit(
                    f"add-{target.name}", actor, room_id, actor.invite(room_id, [target.member_id])
                )
        elif roll < 0.92:
            members = self.server_members(room_id)
            inside = [c for c in self.clients if c.member_id in members and c is not actor]
            if len(members) > 2 and inside and self._can_commit(actor, room_id):
                target = rng.choice(inside)
                self._commit(
                    f"remove-{target.name}",
                    actor,
                    room_id,
                    actor.remove(room_id, [target.member_id]),
                )
        elif self.config.partitions and not any(p.end == 0.0 for p in self.partitions):
            victim = rng.choice(self.clients)
            self.tasks.append(asyncio.create_task(self._partition(victim)))

    async def _partition(self, victim: SimClient) -> None:
        rng = self.rng
        p = Partition(victim.name, self.loop.time())
        p.epochs_before = {self.label(r): self.server_epoch(r) for r in self.rooms}
        self.partitions.append(p)
        self.net.partition(victim.name)
        duration = rng.uniform(4.0, 15.0)
        await asyncio.sleep(duration * 0.3)
        for room_id in sorted(self.rooms, key=self.label):  # the others commit meanwhile
            others = [
                c
                for c in self._members_of(room_id)
                if c is not victim and self._can_commit(c, room_id)
            ]
            if others:
                c = rng.choice(others)
                self._commit("update", c, room_id, c.self_update(room_id))
        await asyncio.sleep(duration * 0.7)
        self.net.heal(victim.name)
        p.end = self.loop.time()
        p.epochs_after = {self.label(r): self.server_epoch(r) for r in self.rooms}

    async def workload(self) -> None:
        self.net.set_profile(NetProfile.at_loss(self.config.loss))
        self.trace("workload", self.config.loss)
        end = self.loop.time() + self.config.workload
        if self.cluster is not None:
            rooms = sorted(self.rooms, key=self.label)
            duration = self.config.workload
            self.tasks.append(asyncio.create_task(self.cluster.faults(duration, rooms)))
            if self.config.cuts:
                self.tasks.append(asyncio.create_task(self.cluster.cuts(duration, rooms)))
            if self.config.join:
                self.tasks.append(asyncio.create_task(self.cluster.joins(duration)))
        while self.loop.time() < end:
            await asyncio.sleep(self.rng.expovariate(1 / 0.25))
            self.step()
        await asyncio.gather(*self.tasks)
        for p in self.partitions:
            if p.end == 0.0:
                self.net.heal(p.client)
        self.trace("workload-done")

    # --- settle -------------------------------------------------------------------------------

    def pending_work(self) -> list[str]:
        """What still has to happen before the clients are caught up (empty: converged)."""
        out = []
        for c in self.clients:
            if not c._connected.is_set():
                out.append(f"{c.name} not connected")
            if any(
                p.room_id in self.rooms and c.is_active(p.room_id) for p in c.core.outbox.values()
            ):
                out.append(f"{c.name} has requests in flight")
            for room_id, label in self.rooms.items():
                member = c.member_id in self.server_members(room_id)
                room = c.core.rooms.get(room_id)
                if not member:
                    if room is not None and room.active:
                        out.append(f"{c.name} not told yet that it left {label}")
                    continue
                if room is None or not room.active:
                    out.append(f"{c.name} not in {label}")
                elif not room.anchored or room.syncing or room.ahead:
                    out.append(f"{c.name} syncing {label}")
                elif room.last_seen != self.server_next(room_id) - 1:
                    out.append(f"{c.name} at {room.last_seen} of {label}")
        return out

    async def settle(self) -> list[str]:
        deadline = self.loop.time() + self.config.settle_limit
        quiet = 0
        while self.loop.time() < deadline:
            await asyncio.sleep(1.0)
            quiet = quiet + 1 if not self.pending_work() else 0
            if quiet >= 3:
                break
        left = self.pending_work()
        self.trace("settled", "yes" if not left else "NO", *left)
        return left


# --- properties -----------------------------------------------------------------------------


async def check(world: World, unsettled: list[str]) -> dict[str, list[str]]:
    v: dict[str, list[str]] = {name: [] for name in PROPERTIES}
    clients = world.clients
    names = {c.member_id: c.name for c in clients}

    # Server truth: the stored log of each room.
    logs: dict[str, list[Frame]] = {}
    for room_id, label in world.rooms.items():
        stored = await world.store.load_frames(room_id, 0, 1 << 30)
        state = await world.store.load_room(room_id)
        assert state is not None
        if [f.log_index for f in stored] != list(range(len(stored))):
            v["dense_log"].append(f"{label}: store log is not dense from 0")
        if state.room.next_log_index != len(stored):
            v["dense_log"].append(f"{label}: next_log_index {state.room.next_log_index}")
        logs[label] = [Frame.decode(f.encode()) for f in stored]

    # Convergence of everyone the server counts as a member.
    for room_id, label in world.rooms.items():
        members = world.server_members(room_id)
        epoch = world.server_epoch(room_id)
        views = []
        for member_id in sorted(members):
            c = world.by_member(member_id)
            assert c is not None
            room = c.core.rooms.get(room_id)
            if room is None or not room.active:
                v["converged"].append(f"{label}: {c.name} is a member but has no active room")
                continue
            if not room.anchored or room.epoch != epoch or room.last_seen != len(logs[label]) - 1:
                v["converged"].append(
                    f"{label}: {c.name} at epoch {room.epoch}, log {room.last_seen} "
                    f"(anchored={room.anchored}); server epoch {epoch}, log {len(logs[label]) - 1}"
                )
                continue
            views.append((c.name, room.group.epoch_authenticator, room.group.sender_key_secret()))
        if len({(a, s) for _, a, s in views}) > 1:
            v["converged"].append(
                f"{label}: epoch secrets differ among {[n for n, _, _ in views]}"
            )
        for c in clients:
            room = c.core.rooms.get(room_id)
            if room is not None and room.active and c.member_id not in members:
                v["removed_members_notice"].append(
                    f"{label}: {c.name} believes it is a member at epoch {room.epoch}; "
                    f"the server removed it (server epoch {epoch})"
                )
    if unsettled:
        v["converged"].append("did not settle: " + "; ".join(unsettled[:8]))

    # Each client's messages, in the order of its send calls.
    if world.config.rate_limit is None or world.config.loss == 0.0:
        for c in clients:
            calls: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
            for (name, rid), call in world.sent.items():  # in call order
                index = c.acked.get(rid, ("", None))[1] if name == c.name else None
                if index is not None:
                    calls[call.room].append((index, call.body, rid))
            for label, indexes in calls.items():
                for (a, body_a, _), (b, body_b, _) in itertools.pairwise(indexes):
                    if b < a:
                        v["sends_in_order"].append(
                            f"{label}: {c.name}'s {body_b} at {b}, before {body_a} at {a}"
                        )

    # The stored log against what was sent and acknowledged.
    for label, frames in logs.items():
        seen = Counter(
            (f.header.sender_id, f.header.request_id)
            for f in frames
            if f.header.opcode == Opcode.APP_MESSAGE
        )
        for (sender, rid), count in sorted(seen.items()):
            if count > 1:
                sent = world.sent.get((names.get(sender, "?"), rid))
                at = [
                    f.header.context_id
                    for f in frames
                    if (f.header.sender_id, f.header.request_id) == (sender, rid)
                ]
                v["no_duplicate_sequencing"].append(
                    f"{label}: {names.get(sender)}'s request "
                    f"{sent.body if sent else rid} sequenced {count}x at {at}"
                )
    acked: list[tuple[Sent, int]] = []
    for c in clients:
        for rid, (label, index) in sorted(c.acked.items()):
            sent = world.sent.get((c.name, rid))
            if sent is None or index is None:
                continue  # a commit or other request
            acked.append((sent, index))
            frames = logs[label]
            matches = [
                f.header.context_id
                for f in frames
                if f.header.opcode == Opcode.APP_MESSAGE
                and (f.header.sender_id, f.header.request_id) == (c.member_id, rid)
            ]
            if matches != [index]:
                v["acked_stored_once"].append(
                    f"{label}: {sent.body} acked at {index}, stored at {matches}"
                )

    # What each application received.
    for c in clients:
        per_index = Counter((room, index) for room, index, _, _ in c.received)
        per_body = Counter(body for _, _, _, body in c.received)
        dup_index = sorted(k for k, n in per_index.items() if n > 1)
        dup_body = sorted(k for k, n in per_body.items() if n > 1)
        if dup_index or dup_body:
            v["no_double_delivery"].append(
                f"{c.name}: log indexes twice {dup_index[:5]}, bodies twice {dup_body[:5]}"
            )
        for label in world.rooms.values():
            order = [index for room, index, _, _ in c.received if room == label]
            if order != sorted(order):
                v["dense_log"].append(f"{c.name}: {label} messages out of log order")
    for sent, index in acked:
        for c in clients:
            spans = c.intervals.get(sent.room, [])
            expected = any(
                s.anchor is not None and s.anchor < index and (s.left is None or index < s.left)
                for s in spans
            )
            room = c.core.rooms.get(world.room_id(sent.room))
            if expected and spans[-1].left is None and (room is None or room.last_seen < index):
                expected = False  # never caught up that far: reported under "converged"
            got = [
                i for room_l, i, _, body in c.received if room_l == sent.room and body == sent.body
            ]
            if expected and got != [index]:
                v["acked_delivered_once"].append(
                    f"{sent.room}: {c.name} got {sent.body} (acked at {index}) at {got}"
                )

    # Clients partitioned while the others committed.
    for p in world.partitions:
        moved = [r for r, e in p.epochs_after.items() if e > p.epochs_before.get(r, e)]
        c = next(x for x in clients if x.name == p.client)
        for label in moved:
            room_id = world.room_id(label)
            if c.member_id not in world.server_members(room_id):
                continue
            room = c.core.rooms.get(room_id)
            if room is None or not room.active or room.epoch != world.server_epoch(room_id):
                v["partitioned_recovers"].append(
                    f"{c.name} partitioned {p.start:.1f}-{p.end:.1f} while {label} moved "
                    f"{p.epochs_before[label]}->{p.epochs_after[label]}; now "
                    f"{'absent' if room is None else f'epoch {room.epoch}, active={room.active}'}"
                    f", server epoch {world.server_epoch(room_id)}"
                )

    for c in clients:
        for pending in c.core.outbox.values():
            sent = world.sent.get((c.name, pending.request_id))
            in_room = c.core.rooms.get(pending.room_id)
            how = "absent" if in_room is None else f"active={in_room.active}"
            v["requests_resolve"].append(
                f"{c.name}: {pending.kind} {sent.body if sent else pending.request_id} in "
                f"{world.label(pending.room_id)} never acknowledged nor failed (room {how})"
            )
    v["no_unexpected_errors"] += world.unexpected
    for c in clients:
        v["no_unexpected_errors"] += [f"{c.name} undecryptable {u}" for u in c.undecryptable]
    return v


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _captured_errors() -> Iterator[_ErrorLog]:
    handler = _ErrorLog()
    logger = logging.getLogger("kalandra")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def _run(config: SimConfig) -> Result:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    started = time.perf_counter()
    world = World(config, loop)
    cluster = world.cluster
    with _captured_errors() as errors:
        if cluster is None:
            world.hub.start()
        else:
            await cluster.start_all(1 if config.join else None)
        await world.setup()
        await world.workload()
        unsettled = await world.settle()
        violations = await check(world, unsettled)
        if cluster is not None:
            sim_cluster.check(cluster, world.label, violations)
        violations["no_unexpected_errors"] += errors.records
        if cluster is None:
            await world.hub.stop()
        else:
            await cluster.stop()
    for c in world.clients:
        c._closing = True
    s = world.net.stats
    stats = {
        "virtual_s": round(loop.time(), 1),
        "log": {label: world.server_next(r) for r, label in world.rooms.items()},
        "epochs": {label: world.server_epoch(r) for r, label in world.rooms.items()},
        "sent": len(world.sent),
        "acked": sum(1 for c in world.clients for rid in c.acked if (c.name, rid) in world.sent),
        "frames": s.frames,
        "retrans": s.retransmissions,
        "breaks": s.breaks,
        "dups": s.duplicates,
        "connects": s.connects,
        "partitions": len(world.partitions),
    }
    if cluster is not None:
        ledger = cluster.ledger
        stats["cluster"] = {
            "crashes": len(ledger.crashes),
            "pauses": ledger.pauses,
            "cuts": len(ledger.cuts),
            "taken_in_cuts": sim_cluster.taken_during_cuts(cluster),
            "grants": len(ledger.grants),
            "fenced": len(ledger.fenced),
            "handovers": len(ledger.handovers),
            "handed_to_joined": sum(
                1 for _, _, _, to in ledger.handovers if to != cluster.names[0]
            ),
            "failover_s": sim_cluster.failover_times(cluster),
            "bus": cluster.links.messages,
            "bus_lost": cluster.links.lost,
        }
    return Result(
        config,
        violations,
        world.trace.digest(),
        world.trace.lines,
        stats,
        time.perf_counter() - started,
    )


def simulate(config: SimConfig) -> Result:
    return run_virtual(_run(config))
