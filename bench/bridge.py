"""The Matrix bridge end to end, against a real (throwaway) Synapse.

Synapse runs from ``.venv-synapse/`` (installed by ``bash bridge/devstack/install_synapse.sh``;
without it this benchmark prints that it is skipped and returns nothing), the bridge as its
own process (``python -m bridge``, embedded Kalandra server, SQLite), all on this machine.
Setup (not measured, its duration is printed): a Matrix admin makes a portal through the bot
and has a native member (a ``kalandra_core`` Client over TCP) added; a few messages each way
first, so the ghost and the Matrix user's puppet leaf exist before anything is timed.

Every message carries its send time (wall clock, same machine) in its body; latency is
arrival at the receiving client minus that. Throughput is messages received divided by the
time from the first send to the last arrival. Each run also reports send failures, duplicates
and whether the receiver saw the messages in Kalandra log order. The embedded server's
per-session rate limit is raised out of the way (a burst is sent at once).

Figures:

* the limit, Synapse's own send rate, one request at a time (a portal sends in log order, so
  its per-room rate is bounded by one Synapse round trip per message): an appservice user of
  the bridge's namespace (what a ghost is) sends N messages straight to Synapse into a room
  with a local Matrix user in it, as a portal is. This is the ratios' limit. For context, a
  plain Matrix user in a plain room (no appservice involved) one at a time and with 4 requests
  in flight. N = 200 quick / 2,000 full.
* references taken in the same conditions as the bridge's runs, no target: right after the
  bridge's native -> Matrix burst, the same burst from that appservice user into its room
  while the local user times arrivals by /sync (the limit above has nobody syncing, the
  bridge's run has the admin syncing); and the Matrix -> native burst held against the Matrix
  user's own send rate in it (a portal cannot deliver faster than its sender sends).
* native -> Matrix: the native member sends at a steady rate (20 msgs/s, or half Synapse's
  rate if that is lower; 5 s quick / 50 s full) and then N at once; the Matrix admin times the
  ghost's events by /sync. Targets: rate >= 0.90 x the limit, p99 < 250 ms at the steady rate.
* Matrix -> native: the Matrix admin sends (one request at a time, as any client does) at the
  steady rate and then N as fast as Synapse takes them; the native member times arrivals.
  Target: rate >= 0.90 x the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

from ._bridge_stack import BridgeBenchStack, MatrixUser, run_on_stack
from .common import Distribution, Figure, Results

RATE_TARGET = 0.90  # bridge rate / Synapse's sequential send rate
P99_TARGET_MS = 250.0  # native -> Matrix at the steady rate
STEADY_RATE = 20.0  # msgs/s, at most
CONCURRENCY = 4  # requests in flight for Synapse's concurrent reference rate
WARMUP = 5  # messages each way before timing
_BODY = re.compile(r"^(\S+) (\d+) sent=([0-9.]+)$")


@dataclass(slots=True)
class Arrivals:
    """What one receiving client saw of one run (tag), by message number."""

    tag: str
    sent_at: dict[int, float] = field(default_factory=dict)  # from the bodies
    arrived: dict[int, float] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    duplicates: int = 0
    # Kalandra log index by message number, where known: the order the bridge must keep
    # (a native client re-encrypts and resends a message that raced an epoch change, so the
    # log may differ from the send order).
    log_index: dict[int, int] = field(default_factory=dict)

    def note(self, body: str, arrived: float) -> None:
        match = _BODY.match(body)
        if match is None or match.group(1) != self.tag:
            return
        i = int(match.group(2))
        if i in self.arrived:
            self.duplicates += 1
            return
        self.sent_at[i] = float(match.group(3))
        self.arrived[i] = arrived
        self.order.append(i)

    def in_log_order(self) -> bool:
        if len(self.log_index) < len(self.order):
            return self.order == sorted(self.order)
        return self.order == sorted(self.order, key=self.log_index.__getitem__)

    def resequenced(self) -> int:
        """Messages the log holds out of send order."""
        by_log = sorted(self.log_index, key=self.log_index.__getitem__)
        return sum(a > b for a, b in itertools.pairwise(by_log))

    def latencies_ms(self) -> list[float]:
        return sorted((self.arrived[i] - self.sent_at[i]) * 1000 for i in self.arrived)


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    sent: int
    failures: int
    send_span: float
    seen: Arrivals

    @property
    def received(self) -> int:
        return len(self.seen.arrived)

    @property
    def throughput(self) -> float:
        if not self.seen.arrived:
            return 0.0
        span = max(self.seen.arrived.values()) - min(self.seen.sent_at.values())
        return self.received / span if span > 0 else float("nan")

    def report(self) -> str:
        lat = self.seen.latencies_ms()
        resequenced = self.seen.resequenced()
        return (
            f"bridge {self.label}: sent {self.sent:,} in {self.send_span:.2f} s "
            f"({self.sent / self.send_span:,.1f}/s), received {self.received:,} "
            f"({self.throughput:,.1f} msgs/s); latency p50 {_percentile(lat, 50):,.1f} / "
            f"p99 {_percentile(lat, 99):,.1f} / max {lat[-1] if lat else float('nan'):,.1f} ms; "
            f"{self.failures} send failures, {self.seen.duplicates} duplicates, "
            f"log order {'kept' if self.seen.in_log_order() else 'BROKEN'}"
            + (f" ({resequenced} resequenced by the client)" if resequenced else "")
            + ("" if self.received == self.sent else " -- NOT everything arrived")
        )


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _body(tag: str, i: int) -> str:
    return f"{tag} {i} sent={time.time():.6f}"


def _html(i: int, body: str) -> str | None:
    # Some formatted, as in real chat; the HTML says what the body says (the bridge makes the
    # plain body the HTML's text when they disagree: no hidden text).
    return f"<b>{body}</b>" if i % 10 == 0 else None


async def _pace(
    count: int, per_second: float | None, one: Callable[[int], Awaitable[None]]
) -> float:
    """``one(i)`` for each message, at ``per_second`` (None: back to back); the span, s."""
    start = time.perf_counter()
    for i in range(count):
        if per_second is not None:
            delay = start + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await one(i)
    return time.perf_counter() - start


# --- the limit: Synapse alone -------------------------------------------------------------------


async def _ghost_rate(ghost: MatrixUser, reader: MatrixUser, n: int) -> tuple[float, str]:
    """Sends per second of an appservice user straight to Synapse, one at a time, into a room
    with ``reader`` (a local user) in it; and that room."""
    room = await ghost.create_room(invite=[reader.user_id])
    await reader.join(room)
    for i in range(WARMUP):
        await ghost.send(room, f"warm-up {i}")
    start = time.perf_counter()
    for i in range(n):
        await ghost.send(room, body := _body("ghost", i), _html(i, body))
    return n / (time.perf_counter() - start), room


async def _ghost_burst(
    ghost: MatrixUser, reader: MatrixUser, room: str, n: int, within: float
) -> Run:
    """The bridge's native -> Matrix burst without the bridge, timed as the bridge's is: the
    appservice user sends ``n`` into its room, one request at a time, while ``reader`` times
    arrivals by /sync. Run right after the bridge's burst: the limit under the same conditions
    (a receiver syncing, which the limit above does not have) at nearly the same moment."""
    seen = Arrivals(f"alone-{secrets.token_hex(3)}")
    await reader.sync(0)  # from now on
    receiving = asyncio.create_task(_matrix_receiver(reader, room, ghost.user_id, seen, n, within))
    start = time.perf_counter()
    for i in range(n):
        await ghost.send(room, body := _body(seen.tag, i), _html(i, body))
    span = time.perf_counter() - start
    await receiving
    return Run("Synapse alone, the same burst, a receiver syncing", n, 0, span, seen)


async def _synapse_rates(user: MatrixUser, n: int) -> tuple[float, float]:
    """Sends per second into a plain room: one at a time, and CONCURRENCY in flight."""
    room = await user.create_room()
    for i in range(WARMUP):
        await user.send(room, f"warm-up {i}")
    start = time.perf_counter()
    for i in range(n):
        await user.send(room, body := _body("ref", i), _html(i, body))
    sequential = n / (time.perf_counter() - start)

    async def worker(w: int) -> None:
        for i in range(w, n, CONCURRENCY):
            await user.send(room, body := _body("ref-c", i), _html(i, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return sequential, n / (time.perf_counter() - start)


# --- native -> Matrix ---------------------------------------------------------------------------


async def _matrix_receiver(
    user: MatrixUser, portal: str, ghost: str, seen: Arrivals, count: int, within: float
) -> None:
    try:
        async with asyncio.timeout(within):
            while len(seen.arrived) < count:
                for event in await user.sync(5_000):
                    if event.room_id == portal and event.sender == ghost:
                        seen.note(str(event.content.get("body", "")), event.arrived)
    except TimeoutError:
        pass  # reported as what did not arrive


async def _native_to_matrix(
    stack: BridgeBenchStack,
    admin: MatrixUser,
    native: Client,
    room: bytes,
    label: str,
    count: int,
    per_second: float | None,
    within: float,
) -> Run:
    tag = f"n2m-{secrets.token_hex(3)}"
    seen = Arrivals(tag)
    await admin.sync(0)  # from now on
    ghost = f"@kalandra_{native.core.member_id}:localhost"
    receiving = asyncio.create_task(
        _matrix_receiver(admin, stack.portal, ghost, seen, count, within)
    )
    echoing = asyncio.create_task(_native_echoes(native, seen, count, within))
    acks: list[asyncio.Task[int]] = []

    async def one(i: int) -> None:
        body = _body(tag, i)
        content = Content(body, formatted_body=_html(i, body))
        acks.append(asyncio.create_task(native.send(room, content)))
        await asyncio.sleep(0)  # let it go out now, so the time in the body is the send time

    span = await _pace(count, per_second, one)
    results = await asyncio.gather(*acks, return_exceptions=True)
    await receiving
    with contextlib.suppress(TimeoutError):  # echoes come first; this is only a bound
        await asyncio.wait_for(echoing, 15)
    _drain(native)
    failures = sum(isinstance(r, BaseException) for r in results)
    return Run(label, count, failures, span, seen)


async def _native_echoes(native: Client, seen: Arrivals, count: int, within: float) -> None:
    """The log index of each of the native member's own messages, from its echoes."""
    own = native.core.member_id
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while len(seen.log_index) < count:
                message = await native.messages.get()
                match = _BODY.match(message.content.body)
                if message.sender_id == own and match and match.group(1) == seen.tag:
                    seen.log_index[int(match.group(2))] = message.log_index


def _drain(native: Client) -> None:
    """The native member's own echoes are not measured; keep its queue short."""
    while not native.messages.empty():
        native.messages.get_nowait()


# --- Matrix -> native ---------------------------------------------------------------------------


async def _native_receiver(native: Client, seen: Arrivals, count: int, within: float) -> None:
    own = native.core.member_id
    try:
        async with asyncio.timeout(within):
            while len(seen.arrived) < count:
                message = await native.messages.get()
                if message.sender_id != own:
                    seen.note(message.content.body, time.time())
    except TimeoutError:
        pass


async def _matrix_to_native(
    stack: BridgeBenchStack,
    admin: MatrixUser,
    native: Client,
    label: str,
    count: int,
    per_second: float | None,
    within: float,
) -> Run:
    tag = f"m2n-{secrets.token_hex(3)}"
    seen = Arrivals(tag)
    _drain(native)
    receiving = asyncio.create_task(_native_receiver(native, seen, count, within))
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        try:
            await admin.send(stack.portal, body := _body(tag, i), _html(i, body))
        except RuntimeError:
            failures += 1

    span = await _pace(count, per_second, one)
    await receiving
    return Run(label, count, failures, span, seen)


# --- the run ------------------------------------------------------------------------------------


async def _warm_up(
    admin: MatrixUser, native: Client, room: bytes, stack: BridgeBenchStack
) -> None:
    """A few messages each way: the ghost and the puppet leaf are made here, not timed."""
    await _native_to_matrix(stack, admin, native, room, "warm-up", WARMUP, None, 120)
    run = await _matrix_to_native(stack, admin, native, "warm-up", WARMUP, None, 120)
    if run.received < WARMUP:
        raise RuntimeError(
            f"warm-up: only {run.received} of {WARMUP} reached the native member; "
            f"bridge log:\n{stack.log_tail(8000)}"
        )


def _check_alive(stack: BridgeBenchStack) -> None:
    if not stack.bridge_alive():
        raise RuntimeError(f"the bridge process died:\n{stack.log_tail()}")


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    n = 200 if quick else 2_000
    steady_seconds = 5.0 if quick else 50.0
    within = 120.0 if quick else 600.0

    t0 = time.perf_counter()
    admin = await stack.matrix_user(admin_name)
    reference = await stack.matrix_user(f"benchref_{secrets.token_hex(3)}")
    native = await stack.native_client()
    room = await stack.portal_with_native(admin, native, "bench")
    await _warm_up(admin, native, room, stack)
    print(
        f"bridge: Synapse pid {stack.synapse.process.pid if stack.synapse.process else '?'}, "
        f"bridge pid {stack.bridge.pid if stack.bridge else '?'} (SQLite, embedded Kalandra "
        f"server, unencrypted portal); setup (portal, native member, warm-up) "
        f"{time.perf_counter() - t0:.1f} s"
    )

    plain, concurrent = await _synapse_rates(reference, n)
    ghost = await stack.appservice_user(f"kalandra_benchref{secrets.token_hex(3)}")
    sequential, ghost_room = await _ghost_rate(ghost, reference, n)
    print(
        f"bridge limit: Synapse send N={n:,} one at a time, appservice user, room with a local"
        f" user: {sequential:,.1f} msgs/s; plain user, plain room: {plain:,.1f} msgs/s one at"
        f" a time, {concurrent:,.1f} msgs/s with {CONCURRENCY} in flight"
    )
    rate = max(1.0, min(STEADY_RATE, round(sequential / 2)))
    steady_n = max(10, int(rate * steady_seconds))

    runs: list[Run] = []
    for label, count, per_second in (
        (f"native->Matrix at {rate:g}/s", steady_n, rate),
        ("native->Matrix at max rate", n, None),
    ):
        runs.append(
            await _native_to_matrix(stack, admin, native, room, label, count, per_second, within)
        )
        print(runs[-1].report())
        _check_alive(stack)
    alone = await _ghost_burst(ghost, reference, ghost_room, n, within)
    ratio = runs[-1].throughput / alone.throughput if alone.throughput else float("nan")
    print(
        f"bridge reference: {alone.label}: received {alone.received:,} of {n:,} "
        f"({alone.throughput:,.1f} msgs/s); bridge / this: {ratio:.2f}"
    )
    for label, count, per_second in (
        (f"Matrix->native at {rate:g}/s", steady_n, rate),
        ("Matrix->native at max rate", n, None),
    ):
        runs.append(
            await _matrix_to_native(stack, admin, native, label, count, per_second, within)
        )
        print(runs[-1].report())
        _check_alive(stack)
    tracebacks = stack.tracebacks()
    if tracebacks:
        print(f"bridge: {tracebacks} tracebacks in the bridge's log:\n{stack.log_tail()}")

    n2m_steady, n2m_max, m2n_steady, m2n_max = runs
    n2m_lat, m2n_lat = n2m_steady.seen.latencies_ms(), m2n_steady.seen.latencies_ms()
    limit = "Synapse AS send 1-at-a-time"
    figures = [
        Figure(
            "Synapse send, appservice user, 1 at a time",
            sequential,
            "msgs/s",
            "- (the limit)",
            "plain user, plain room",
            plain,
            decimals=1,
        ),
        Figure(
            "Synapse send, plain room, 1 at a time",
            plain,
            "msgs/s",
            "- (context)",
            f"{CONCURRENCY} in flight",
            concurrent,
            decimals=1,
        ),
        Figure(
            "bridge native->Matrix, max rate",
            n2m_max.throughput,
            "msgs/s",
            f">= {RATE_TARGET:.2f} x limit",
            limit,
            sequential,
            decimals=1,
        ),
        Figure(
            "bridge native->Matrix, max rate, against Synapse alone",
            n2m_max.throughput,
            "msgs/s",
            "-",
            "the same burst, a receiver syncing",
            alone.throughput,
            decimals=1,
        ),
        Figure(
            f"bridge native->Matrix p50 @ {rate:g}/s",
            _percentile(n2m_lat, 50),
            "ms",
            "-",
            "p99 target",
            P99_TARGET_MS,
            decimals=1,
        ),
        Figure(
            f"bridge native->Matrix p99 @ {rate:g}/s",
            _percentile(n2m_lat, 99),
            "ms",
            f"p99 < {P99_TARGET_MS:g} ms",
            "target",
            P99_TARGET_MS,
            decimals=1,
        ),
        Figure(
            "bridge Matrix->native, max rate",
            m2n_max.throughput,
            "msgs/s",
            f">= {RATE_TARGET:.2f} x limit",
            limit,
            sequential,
            decimals=1,
        ),
        Figure(
            "bridge Matrix->native, max rate, against its sender",
            m2n_max.throughput,
            "msgs/s",
            "-",
            "the Matrix user's own send rate",
            m2n_max.sent / m2n_max.send_span,
            decimals=1,
        ),
        Figure(
            f"bridge Matrix->native p50 @ {rate:g}/s",
            _percentile(m2n_lat, 50),
            "ms",
            "-",
            "n->M p99 target",
            P99_TARGET_MS,
            decimals=1,
        ),
        Figure(
            f"bridge Matrix->native p99 @ {rate:g}/s",
            _percentile(m2n_lat, 99),
            "ms",
            "-",
            "n->M p99 target",
            P99_TARGET_MS,
            decimals=1,
        ),
    ]
    steady = f"{rate:g} msgs/s"
    distributions = [
        Distribution("native->Matrix", tuple(n2m_lat), steady, P99_TARGET_MS, "p99 target"),
        # No target this way (docs/performance-targets.md); the other direction's is drawn
        # for scale.
        Distribution(
            "Matrix->native", tuple(m2n_lat), steady, P99_TARGET_MS, "n->M target, for scale"
        ),
    ]
    return Results(figures, distributions)


def run(quick: bool) -> Results:
    return run_on_stack("bridge", _measure, quick)
