"""Many portals at once, and start-up with many portals, against a real (throwaway) Synapse.

The stack is bench/_bridge_stack.py's (Synapse, ``python -m bridge`` with its embedded Kalandra
server, SQLite); message bodies, arrival bookkeeping and pacing are bench/bridge.py's. Portals are
made through the provisioning API (no bot command round trips), each with its own native member
(a ``kalandra_core`` Client over TCP) added by the bot; a few messages each way first in every
portal, so ghosts and the admin's puppet leaves exist before anything is timed.

Figures (P portals, N messages per portal and direction; quick: P = 5, N = 15; full: P = 50,
N = 40):

* the limits, measured in the same run: P appservice users of the bridge's namespace (what
  ghosts are), each in a room of its own with the Matrix admin in it, send N messages each,
  concurrently, one request at a time per room (a portal sends in log order) — Synapse's
  aggregate appservice send rate at the same concurrency; and the Matrix admin sends N into
  each of those rooms the same way — Synapse's aggregate client send rate, the other side's.
* native -> Matrix: every native member sends N at once into its portal; the admin times the
  ghosts' events by /sync. Aggregate rate = messages received / (last arrival - first send).
  Target: >= 0.90 x the appservice limit. Just after it, the same burst on Synapse alone (the
  limits' appservice users, one request at a time per room, the admin timing it by /sync) is
  printed with the bridge's ratio to it: the limit under the same conditions and at nearly the
  same moment (on a shared machine Synapse's rate moves by a factor of two within minutes).
* Matrix -> native: the admin sends N into every portal, one request at a time per portal,
  all portals concurrently; the native members time arrivals. Target: >= 0.90 x the client
  limit.
* native -> Matrix latency at half load: every portal at (appservice limit / 2 / P) msgs/s for
  5 s (quick) / 20 s (full), pooled p99. Target: < 250 ms. Just before it, the same load on
  Synapse alone (the limits' appservice users into their rooms, timed the same way): its p99 is
  printed as the reference, what the bridge's own share of the latency is seen against.
* start-up (its own benchmark, ``--only bridge-startup``): S idle portals (quick: 20, full:
  1,000) and one with a native member are made; the bridge is stopped and started again and
  timed from the process start to ready (``/_matrix/mau/ready`` answering 200), until a new
  portal can be made through the provisioning API (tried again while the bridge answers
  503/504), and until a message each way crossed the portal with the native member (both at
  once, with the new portal): what users wait for. Target: < 15 s for each. RSS per idle
  portal: (RSS with S portals - RSS with none) / S, each measured 2 s after the start.

Per-portal order is checked: a portal whose messages arrive out of log order, twice, or not at
all fails the benchmark (RuntimeError), whatever its speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

from ._bridge_stack import BridgeBenchStack, MatrixUser, run_on_stack
from .bridge import (
    P99_TARGET_MS,
    RATE_TARGET,
    WARMUP,
    Arrivals,
    _body,
    _drain,
    _html,
    _native_echoes,
    _native_receiver,
    _pace,
    _percentile,
)
from .common import Distribution, Figure, Results, cpu_seconds

STARTUP_TARGET_S = 15.0
_CREATE_CONCURRENCY = 4  # portals made at once during setup (setup is not measured)


@dataclass(slots=True)
class ManyPortal:
    room: bytes  # the Kalandra room
    mxid: str  # its Matrix room
    native: Client

    @property
    def ghost(self) -> str:
        return f"@kalandra_{self.native.core.member_id}:localhost"


@dataclass(frozen=True, slots=True)
class Aggregate:
    label: str
    sent: int
    seen: list[Arrivals]  # one per portal

    @property
    def received(self) -> int:
        return sum(len(a.arrived) for a in self.seen)

    @property
    def throughput(self) -> float:
        first = min((min(a.sent_at.values()) for a in self.seen if a.sent_at), default=0.0)
        last = max((max(a.arrived.values()) for a in self.seen if a.arrived), default=0.0)
        return self.received / (last - first) if last > first else 0.0

    def latencies_ms(self) -> list[float]:
        return sorted(ms for a in self.seen for ms in a.latencies_ms())

    def check(self) -> str:
        """One line on the run; RuntimeError if a portal lost, doubled or reordered messages."""
        broken = [i for i, a in enumerate(self.seen) if not a.in_log_order()]
        duplicates = sum(a.duplicates for a in self.seen)
        lat = self.latencies_ms()
        line = (
            f"bridge-many {self.label}: {len(self.seen)} portals, received {self.received:,} "
            f"of {self.sent:,} ({self.throughput:,.1f} msgs/s); latency p50 "
            f"{_percentile(lat, 50):,.1f} / p99 {_percentile(lat, 99):,.1f} ms; "
            f"{duplicates} duplicates; per-portal order "
            + ("kept" if not broken else f"BROKEN in portals {broken}")
        )
        if broken or duplicates or self.received != self.sent:
            raise RuntimeError(f"{line} -- messages lost, doubled or out of order")
        return line


async def _bounded(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(i)`` for i < count, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> None:
        async with gate:
            await one(i)

    await asyncio.gather(*(guarded(i) for i in range(count)))


# --- setup --------------------------------------------------------------------------------------


async def _provision(
    stack: BridgeBenchStack, admin: MatrixUser, name: str, within: float = 600.0
) -> tuple[bytes, str]:
    """A new portal, tried again while the bridge answers that it is busy (503, 504)."""
    async with asyncio.timeout(within):
        while True:
            try:
                return await stack.provision_room(admin, name)
            except RuntimeError as exc:
                if "HTTP 503" not in str(exc) and "HTTP 504" not in str(exc):
                    raise
            await asyncio.sleep(0.5)


async def _make_portals(
    stack: BridgeBenchStack, admin: MatrixUser, count: int
) -> list[ManyPortal]:
    rooms: list[tuple[bytes, str]] = [(b"", "")] * count

    async def create(i: int) -> None:
        rooms[i] = await _provision(stack, admin, f"bench many {i}")
        await admin.join(rooms[i][1])

    await _bounded(count, _CREATE_CONCURRENCY, create)
    portals = []
    for room, mxid in rooms:  # one at a time: bot_command reads the admin's sync
        native = await stack.native_client()
        await stack.add_native(admin, mxid, room, native)
        portals.append(ManyPortal(room, mxid, native))
    return portals


async def _idle_portals(stack: BridgeBenchStack, admin: MatrixUser, count: int) -> None:
    async def create(i: int) -> None:
        await stack.provision_room(admin, f"bench idle {i}")

    await _bounded(count, _CREATE_CONCURRENCY * 2, create)


# --- the limits: Synapse alone ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    appservice: float  # aggregate msgs/s of the appservice users
    client: float  # aggregate msgs/s of the admin
    ghosts: list[MatrixUser]  # one appservice user per room
    rooms: list[str]


async def _synapse_limits(
    stack: BridgeBenchStack, admin: MatrixUser, portals: int, n: int
) -> Limits:
    """Aggregate sends per second, ``portals`` rooms at once, one request at a time per room:
    appservice users (one per room, the admin in each room), then the admin into the same
    rooms."""
    ghosts = [
        await stack.appservice_user(f"kalandra_benchmany{secrets.token_hex(3)}")
        for _ in range(portals)
    ]
    rooms = [await g.create_room(invite=[admin.user_id]) for g in ghosts]
    for room in rooms:
        await admin.join(room)
    for ghost, room in zip(ghosts, rooms, strict=True):
        for i in range(WARMUP):
            await ghost.send(room, f"warm-up {i}")

    async def all_at_once(sender: Callable[[int], MatrixUser], tag: str) -> float:
        async def one_room(r: int) -> None:
            for i in range(n):
                await sender(r).send(rooms[r], body := _body(tag, i), _html(i, body))

        start = time.perf_counter()
        await asyncio.gather(*(one_room(r) for r in range(portals)))
        return portals * n / (time.perf_counter() - start)

    appservice = await all_at_once(lambda r: ghosts[r], "limit-as")
    client = await all_at_once(lambda r: admin, "limit-client")
    return Limits(appservice, client, ghosts, rooms)


async def _limit_receiver(
    admin: MatrixUser, limits: Limits, seen: list[Arrivals], count: int, within: float
) -> None:
    """The admin's /sync, each event of a room's appservice user noted in its arrivals."""
    by_room = {
        room: (ghost.user_id, arrivals)
        for ghost, room, arrivals in zip(limits.ghosts, limits.rooms, seen, strict=True)
    }
    total = count * len(seen)
    with contextlib.suppress(TimeoutError):  # reported as what did not arrive
        async with asyncio.timeout(within):
            while sum(len(a.arrived) for a in seen) < total:
                for event in await admin.sync(5_000):
                    sender, arrivals = by_room.get(event.room_id, ("", None))
                    if arrivals is not None and event.sender == sender:
                        arrivals.note(str(event.content.get("body", "")), event.arrived)


async def _synapse_burst(admin: MatrixUser, limits: Limits, n: int, within: float) -> Aggregate:
    """The bridge's burst without the bridge, timed as the bridge's is: each appservice user
    sends ``n`` into its room, one request at a time, all rooms at once, while the admin
    times arrivals by /sync. Run just after the bridge's burst, it is the limit under the same
    conditions (a receiver syncing) and at nearly the same moment, which the limit measured
    earlier on a shared machine is not always."""
    seen = [Arrivals(f"burst-{secrets.token_hex(3)}") for _ in limits.rooms]
    await admin.sync(0)  # from now on
    receiving = asyncio.create_task(_limit_receiver(admin, limits, seen, n, within))

    async def one_room(r: int) -> None:
        for i in range(n):
            body = _body(seen[r].tag, i)
            await limits.ghosts[r].send(limits.rooms[r], body, _html(i, body))

    await asyncio.gather(*(one_room(r) for r in range(len(limits.rooms))))
    await receiving
    return Aggregate("Synapse alone", n * len(seen), seen)


async def _synapse_latency(
    admin: MatrixUser, limits: Limits, count: int, per_second: float, within: float
) -> Aggregate:
    """Synapse alone at the load of the bridge's latency run: each appservice user sends
    ``count`` into its room at ``per_second`` (not waiting for answers, as the native members
    send), the admin times arrivals by /sync. What the bridge's p99 is held against."""
    seen = [Arrivals(f"lat-{secrets.token_hex(3)}") for _ in limits.rooms]
    await admin.sync(0)  # from now on
    receiving = asyncio.create_task(_limit_receiver(admin, limits, seen, count, within))

    async def one_room(r: int) -> None:
        sends: list[asyncio.Task[str]] = []

        async def one(i: int) -> None:
            body = _body(seen[r].tag, i)
            sends.append(asyncio.create_task(limits.ghosts[r].send(limits.rooms[r], body)))
            await asyncio.sleep(0)

        await _pace(count, per_second, one)
        await asyncio.gather(*sends)

    await asyncio.gather(*(one_room(r) for r in range(len(limits.rooms))))
    await receiving
    return Aggregate("Synapse alone", count * len(seen), seen)


# --- native -> Matrix ---------------------------------------------------------------------------


async def _matrix_receiver(
    admin: MatrixUser, portals: list[ManyPortal], seen: list[Arrivals], count: int, within: float
) -> None:
    """The admin's /sync, each ghost event noted in its portal's arrivals."""
    by_room = {p.mxid: (p.ghost, a) for p, a in zip(portals, seen, strict=True)}
    total = count * len(portals)
    try:
        async with asyncio.timeout(within):
            while sum(len(a.arrived) for a in seen) < total:
                for event in await admin.sync(5_000):
                    ghost, arrivals = by_room.get(event.room_id, ("", None))
                    if arrivals is not None and event.sender == ghost:
                        arrivals.note(str(event.content.get("body", "")), event.arrived)
    except TimeoutError:
        pass  # reported as what did not arrive


async def _native_to_matrix(
    admin: MatrixUser,
    portals: list[ManyPortal],
    label: str,
    count: int,
    per_second: float | None,
    within: float,
) -> Aggregate:
    seen = [Arrivals(f"n2m-{secrets.token_hex(3)}") for _ in portals]
    await admin.sync(0)  # from now on
    receiving = asyncio.create_task(_matrix_receiver(admin, portals, seen, count, within))
    echoes = [
        asyncio.create_task(_native_echoes(p.native, a, count, within))
        for p, a in zip(portals, seen, strict=True)
    ]

    async def one_portal(portal: ManyPortal, arrivals: Arrivals) -> None:
        acks: list[asyncio.Task[int]] = []

        async def one(i: int) -> None:
            body = _body(arrivals.tag, i)
            content = Content(body, formatted_body=_html(i, body))
            acks.append(asyncio.create_task(portal.native.send(portal.room, content)))
            await asyncio.sleep(0)  # out now, so the time in the body is the send time

        await _pace(count, per_second, one)
        await asyncio.gather(*acks)

    await asyncio.gather(*(one_portal(p, a) for p, a in zip(portals, seen, strict=True)))
    await receiving
    for echoing in echoes:
        with contextlib.suppress(TimeoutError):  # echoes come first; this is only a bound
            await asyncio.wait_for(echoing, 15)
    for portal in portals:
        _drain(portal.native)
    return Aggregate(label, count * len(portals), seen)


# --- Matrix -> native ---------------------------------------------------------------------------


async def _matrix_to_native(
    admin: MatrixUser,
    portals: list[ManyPortal],
    label: str,
    count: int,
    per_second: float | None,
    within: float,
) -> Aggregate:
    seen = [Arrivals(f"m2n-{secrets.token_hex(3)}") for _ in portals]
    for portal in portals:
        _drain(portal.native)
    receiving = [
        asyncio.create_task(_native_receiver(p.native, a, count, within))
        for p, a in zip(portals, seen, strict=True)
    ]

    async def one_portal(portal: ManyPortal, arrivals: Arrivals) -> None:
        async def one(i: int) -> None:
            await admin.send(portal.mxid, body := _body(arrivals.tag, i), _html(i, body))

        await _pace(count, per_second, one)

    await asyncio.gather(*(one_portal(p, a) for p, a in zip(portals, seen, strict=True)))
    await asyncio.gather(*receiving)
    return Aggregate(label, count * len(portals), seen)


# --- start-up -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    empty_s: float  # start-up to ready, no portal
    ready_s: float  # start-up to ready, ``idle`` portals
    new_portal_s: float  # start-up until a new portal was made, ``idle`` portals
    messages_s: float  # start-up until a message each way crossed an existing portal
    empty_rss: int
    full_rss: int


async def _both_ways(admin: MatrixUser, probe: ManyPortal, t0: float, within: float) -> float:
    """A message each way through the existing portal ``probe``; seconds from ``t0`` until
    both arrived."""
    tag = secrets.token_hex(3)
    native = probe.native
    _drain(native)
    await admin.sync(0)

    async def to_native() -> None:
        await admin.send(probe.mxid, f"after start m2n {tag}")
        while True:
            message = await native.messages.get()
            if message.content.body == f"after start m2n {tag}":
                return

    async def to_matrix() -> None:
        await native.wait_connected()
        await native.send(probe.room, Content(f"after start n2m {tag}"))
        await admin.sync_until(
            lambda events: any(
                e.room_id == probe.mxid and e.content.get("body") == f"after start n2m {tag}"
                for e in events
            ),
            "the native member's message after the start",
            within,
        )

    async with asyncio.timeout(within):
        await asyncio.gather(to_native(), to_matrix())
    return time.perf_counter() - t0


async def _startup(stack: BridgeBenchStack, admin: MatrixUser, idle: int) -> Startup:
    """Start-up with no portal and with ``idle`` portals (and one with a native member): to
    ready (``/_matrix/mau/ready``), until a new portal can be made, and until a message each
    way crossed the portal with the native member (what users wait for); RSS just after."""
    await stack.stop_bridge()
    empty_s = await stack.start_bridge()
    await asyncio.sleep(2)  # whatever runs just after ready (catch-up) is done
    empty_rss = stack.bridge_rss()
    t0 = time.perf_counter()
    await _idle_portals(stack, admin, idle)
    probe = (await _make_portals(stack, admin, 1))[0]
    print(f"bridge-many: {idle + 1:,} portals made in {time.perf_counter() - t0:.1f} s")
    # The native member is back within half a second of the bridge: its reconnect backoff is
    # not what is measured.
    probe.native.reconnect_max_delay = 0.5
    await stack.stop_bridge()
    t0 = time.perf_counter()
    ready_s = await stack.start_bridge()

    async def new_portal() -> float:
        await _provision(stack, admin, "bench after start")
        return time.perf_counter() - t0

    new_portal_s, messages_s = await asyncio.gather(
        new_portal(), _both_ways(admin, probe, t0, 600.0)
    )
    await asyncio.sleep(2)
    full_rss = stack.bridge_rss()
    await probe.native.close()
    return Startup(empty_s, ready_s, new_portal_s, messages_s, empty_rss, full_rss)


def _startup_figures(up: Startup, idle: int) -> list[Figure]:
    per_portal = (up.full_rss - up.empty_rss) / idle
    print(
        f"bridge-startup: to ready {up.empty_s:.2f} s with no portal, {up.ready_s:.2f} s with "
        f"{idle:,}; {up.new_portal_s:.2f} s until a new portal was made, {up.messages_s:.2f} s "
        f"until a message each way crossed an existing one; RSS "
        f"{up.empty_rss / 2**20:.1f} MiB -> {up.full_rss / 2**20:.1f} MiB, "
        f"{per_portal / 1024:.1f} KiB per idle portal"
    )
    target = f"< {STARTUP_TARGET_S:g} s"
    return [
        Figure(
            f"bridge start-up to ready, {idle:,} portals",
            up.ready_s,
            "s",
            target,
            "target",
            STARTUP_TARGET_S,
            decimals=2,
        ),
        Figure(
            f"bridge start-up to a new portal, {idle:,} portals",
            up.new_portal_s,
            "s",
            target,
            "target",
            STARTUP_TARGET_S,
            decimals=2,
        ),
        Figure(
            f"bridge start-up to a message each way, {idle:,} portals",
            up.messages_s,
            "s",
            target,
            "target",
            STARTUP_TARGET_S,
            decimals=2,
        ),
        Figure(
            "bridge RSS per idle portal",
            per_portal / 1024,
            "KiB",
            "- (reported)",
            "RSS with no portal",
            up.empty_rss / 1024,
            decimals=1,
        ),
    ]


# --- the run ------------------------------------------------------------------------------------


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    count = 5 if quick else 50
    n = 15 if quick else 40
    steady_seconds = 5.0 if quick else 20.0
    within = 120.0 if quick else 600.0

    admin = await stack.matrix_user(admin_name)

    t0 = time.perf_counter()
    portals = await _make_portals(stack, admin, count)
    await _native_to_matrix(admin, portals, "warm-up", WARMUP, None, within)
    warm = await _matrix_to_native(admin, portals, "warm-up", WARMUP, None, within)
    print(warm.check())
    print(
        f"bridge-many: Synapse pid {stack.synapse.process.pid if stack.synapse.process else '?'},"
        f" bridge pid {stack.bridge.pid if stack.bridge else '?'}; setup ({count} portals, "
        f"native members, warm-up) {time.perf_counter() - t0:.1f} s"
    )

    limits = await _synapse_limits(stack, admin, count, n)
    as_limit, client_limit = limits.appservice, limits.client
    print(
        f"bridge-many limits: Synapse send, {count} rooms at once, one request at a time per "
        f"room, N={n} each: appservice users {as_limit:,.1f} msgs/s, the Matrix admin "
        f"{client_limit:,.1f} msgs/s"
    )
    bridge_pid = stack.bridge.pid if stack.bridge else None
    synapse_pid = stack.synapse.process.pid if stack.synapse.process else None
    cpu_at, synapse_at = cpu_seconds(bridge_pid), cpu_seconds(synapse_pid)
    n2m = await _native_to_matrix(admin, portals, "native->Matrix at max rate", n, None, within)
    n2m_cpu = (cpu_seconds(bridge_pid) - cpu_at) * 1000 / max(1, n2m.received)
    n2m_synapse = (cpu_seconds(synapse_pid) - synapse_at) * 1000 / max(1, n2m.received)
    print(n2m.check())
    # Its latencies are not the bridge's kind (each message is timed from its own request,
    # not from the burst's start): only the rate is compared.
    synapse_at = cpu_seconds(synapse_pid)
    burst = await _synapse_burst(admin, limits, n, within)
    burst_synapse = (cpu_seconds(synapse_pid) - synapse_at) * 1000 / max(1, burst.received)
    print(
        f"bridge-many reference: Synapse alone, the same burst just after (appservice users, "
        f"the admin syncing), received {burst.received:,} of {burst.sent:,} "
        f"({burst.throughput:,.1f} msgs/s); bridge / this: "
        f"{n2m.throughput / burst.throughput if burst.throughput else 0.0:.2f}"
    )
    # Synapse is the slow side: what each message costs it, through the bridge and alone.
    print(
        f"bridge-many: Synapse CPU per message native->Matrix {n2m_synapse:.2f} ms, "
        f"alone {burst_synapse:.2f} ms"
    )
    cpu_at = cpu_seconds(bridge_pid)
    m2n = await _matrix_to_native(admin, portals, "Matrix->native at max rate", n, None, within)
    m2n_cpu = (cpu_seconds(bridge_pid) - cpu_at) * 1000 / max(1, m2n.received)
    print(m2n.check())
    # Steadier than the rates, which move with Synapse's: what the bridge spends on each.
    print(
        f"bridge-many: bridge process CPU per message at max rate: native->Matrix "
        f"{n2m_cpu:.2f} ms, Matrix->native {m2n_cpu:.2f} ms"
    )
    half = as_limit / 2
    per_portal_rate = half / count
    steady_count = max(5, int(per_portal_rate * steady_seconds))
    alone = await _synapse_latency(admin, limits, steady_count, per_portal_rate, within)
    alone_lat = alone.latencies_ms()
    print(
        f"bridge-many reference: Synapse alone at {half:,.0f}/s ({count} appservice users, "
        f"same rooms as the limits), received {alone.received:,} of {alone.sent:,}; latency "
        f"p50 {_percentile(alone_lat, 50):,.1f} / p99 {_percentile(alone_lat, 99):,.1f} ms"
    )
    steady = await _native_to_matrix(
        admin,
        portals,
        f"native->Matrix at {half:,.0f}/s",
        steady_count,
        per_portal_rate,
        within,
    )
    print(steady.check())
    tracebacks = stack.tracebacks()
    if tracebacks:
        print(f"bridge-many: {tracebacks} tracebacks in the bridge's log:\n{stack.log_tail()}")

    lat = steady.latencies_ms()
    figures = [
        Figure(
            f"Synapse AS send, {count} rooms at once",
            as_limit,
            "msgs/s",
            "- (the limit)",
            "admin, same rooms",
            client_limit,
            decimals=1,
        ),
        Figure(
            f"bridge native->Matrix, {count} portals",
            n2m.throughput,
            "msgs/s",
            f">= {RATE_TARGET:.2f} x limit",
            f"Synapse AS send, {count} rooms",
            as_limit,
            decimals=1,
        ),
        Figure(
            f"bridge Matrix->native, {count} portals",
            m2n.throughput,
            "msgs/s",
            f">= {RATE_TARGET:.2f} x limit",
            f"Synapse send, {count} rooms",
            client_limit,
            decimals=1,
        ),
        Figure(
            f"bridge native->Matrix p99 @ {half:,.0f}/s, {count} portals",
            _percentile(lat, 99),
            "ms",
            f"p99 < {P99_TARGET_MS:g} ms",
            "target",
            P99_TARGET_MS,
            decimals=1,
        ),
        Figure(
            f"Synapse alone p99 @ {half:,.0f}/s, {count} rooms",
            _percentile(alone_lat, 99),
            "ms",
            "- (reference)",
            "target",
            P99_TARGET_MS,
            decimals=1,
        ),
    ]
    distributions = [
        Distribution(
            f"native->Matrix, {count} portals",
            tuple(lat),
            f"{half:,.0f} msgs/s in all",
            P99_TARGET_MS,
            "p99 target",
        )
    ]
    return Results(figures, distributions)


def run(quick: bool) -> Results:
    return run_on_stack("bridge-many", _measure, quick)


async def _measure_startup(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    idle = 20 if quick else 1_000
    admin = await stack.matrix_user(admin_name)
    up = await _startup(stack, admin, idle)
    tracebacks = stack.tracebacks()
    if tracebacks:
        print(f"bridge-startup: {tracebacks} tracebacks in the bridge's log:\n{stack.log_tail()}")
    return Results(_startup_figures(up, idle))


def run_startup(quick: bool) -> Results:
    """The start-up figures (``python -m bench --only bridge-startup``)."""
    return run_on_stack("bridge-startup", _measure_startup, quick)
