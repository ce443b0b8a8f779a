"""The homeserver end to end: sequencer throughput, native latency, idle sessions.

The server runs in its own process (``python -m kalandra_core serve``), TCP on 127.0.0.1,
with every frame's Ed25519 signature verified and the rate limit raised out of the way, on a
fresh database of each engine: SQLite (WAL, ``synchronous=FULL``) and PostgreSQL (the tests'
server, ``fsync`` and ``synchronous_commit`` on). Both are durable: a frame is echoed only
after its transaction committed. Setup (not measured, its duration is printed): members A
(the room's creator) and B join one room through the native client driver, and R = 8 other
members each create a room of their own; the driver then disconnects. The measurements use
raw connections (an asyncio Protocol and a FrameDecoder, the cheapest reader), a second
session of the same members.

Figures:

* sequencer throughput, on each engine: one room, M AppMessage frames (M = 5,000 quick /
  20,000 full) pre-built and signed by A's ClientCore, written over A's connection all at
  once (pipelined), timed until A has received the echo of every one (or an Error frame for
  it); and R rooms at once, each member writing its own frames (1,000 quick / 5,000
  full) over its own connection, timed until every echo is in. Target
  (docs/performance-targets.md): >= 1.3 x the limit, single-core Ed25519 verification
  (``VerifyKey.verify`` of a 56-byte message, one thread of this process, best of several
  batches) measured in the same run: beating it needs the verify pool on both cores.
* server CPU per message (one room): the CPU time (user + system, all its threads) the server
  process used during the one-room burst, per message, held against what the target leaves:
  2 cores / (1.3 x the verify rate), that rate in CPU time too. Below 1 the server could
  reach the target on a machine of its own; the throughput figures also pay for other
  processes on a busy machine (and for this benchmark's own client, on the same cores).
* native -> native latency (SQLite): A sends at a paced 1,000 msgs/s (2 s quick / 10 s full)
  and a session of B notes the arrival of each; both ends live in this process, so one
  clock. Target: p99 < 10 ms; the limit is that target itself. Printed alongside: the
  Ping -> Pong round trip on the same connection (transport and event loops only).
* idle sessions (SQLite, a server of their own): K connections (K = 1,000 quick / 10,000
  full), each authenticated with a Hello (one account's token and device key, reused) and
  holding. Reported: how many got a HelloReply and were still open a second later (limit: K),
  the server's RSS growth per authenticated session (limit: this machine's memory / 10k), and
  the Ping -> Pong p99 of a fresh client that connects and authenticates while they are held
  (target < 50 ms).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

from nacl.signing import SigningKey

from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.proto import Frame, FrameHeader, Opcode

from ._server_proc import (
    RawConnection,
    ServerProcess,
    nofile_soft,
    raise_nofile,
    raw_connect,
    restore_nofile,
)
from .common import Distribution, Figure, Results, rate

THROUGHPUT_TARGET = 1.3  # x the 1-core Ed25519 verify rate
ROOMS = 8
CORES = min(2, os.cpu_count() or 1)  # what the server can use: its verify pool has 2 threads
FRESH_PONG_TARGET_MS = 50.0
LATENCY_TARGET_MS = 10.0
LATENCY_RATE = 1_000.0  # msgs/s
CONNECTIONS_TARGET = 10_000
_CONNECT_PARALLEL = 200  # handshakes in flight while opening idle connections
_WAIT = 120.0  # seconds: give up waiting for echoes after this


class _Tally:
    """Counts APP_MESSAGE frames from one sender (and Error frames) on one connection."""

    def __init__(self, sender_id: int, *, stamp: bool = False) -> None:
        self.sender_id = sender_id
        self.echoes = 0
        self.errors = 0
        self.arrivals: dict[int, float] | None = {} if stamp else None
        self.target = 0
        self.done: asyncio.Future[float] | None = None
        self.pongs: dict[int, float] = {}

    def expect(self, count: int) -> asyncio.Future[float]:
        """A future set (to the perf_counter time) once ``count`` more frames are in."""
        self.target = self.echoes + self.errors + count
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def __call__(self, frame: Frame) -> None:
        h = frame.header
        if h.opcode == Opcode.APP_MESSAGE and h.sender_id == self.sender_id:
            self.echoes += 1
            if self.arrivals is not None:
                self.arrivals[h.request_id] = time.perf_counter()
        elif h.opcode == Opcode.ERROR:
            self.errors += 1
        else:
            if h.opcode == Opcode.PONG:
                self.pongs[h.request_id] = time.perf_counter()
            return
        done = self.done
        if done is not None and not done.done() and self.echoes + self.errors >= self.target:
            done.set_result(time.perf_counter())


def _messages(core: ClientCore, room: bytes, count: int) -> list[tuple[int, bytes]]:
    """``count`` encrypted, signed AppMessage frames from ``core`` (request id, bytes)."""
    content = Content(body="benchmark message, about one line of chat text")
    frames = [core.send_message(room, content, now=time.time()) for _ in range(count)]
    core.outbox.clear()  # never sent through the driver; nothing to retry
    return frames


async def _setup(server: ServerProcess) -> tuple[ClientCore, ClientCore, bytes]:
    """A creates a room and invites B, through the native client driver."""
    address = ServerAddress("tcp", "127.0.0.1", server.port)
    a_acc, b_acc = server.users["alice"], server.users["bob"]
    a = Client(ClientCore(a_acc.member_id, os.urandom(32)), address, a_acc.token)
    b = Client(ClientCore(b_acc.member_id, os.urandom(32)), address, b_acc.token)
    try:
        await a.connect()
        await b.connect()
        await b.publish_key_packages(1)
        room = await a.create_room(name="bench")
        await a.invite(room, [b_acc.member_id])
        joined = await asyncio.wait_for(b.joined.get(), 30)
        if joined != room:
            raise AssertionError("B joined another room")
        await b.settle()
        await a.settle()
    finally:
        await a.close()
        await b.close()
    return a.core, b.core, room


async def _throughput(
    a_conn: RawConnection, a_tally: _Tally, b_tally: _Tally, frames: list[bytes]
) -> tuple[float, float]:
    """Write all ``frames`` at once; (seconds until A has every echo or Error, the same for
    B's echoes). A side that gives up waiting reports the time it gave up (the counts tell)."""
    a_done = a_tally.expect(len(frames))
    b_done = b_tally.expect(len(frames))
    start = time.perf_counter()
    a_conn.write(b"".join(frames))
    a_end = await _until(a_done, _WAIT)
    b_end = await _until(b_done, 5.0)  # errors go to A only: B may never see them all
    return a_end - start, b_end - start


async def _until(done: asyncio.Future[float], wait: float) -> float:
    try:
        return await asyncio.wait_for(asyncio.shield(done), wait)
    except TimeoutError:
        return time.perf_counter()


async def _paced(
    a_conn: RawConnection, b_tally: _Tally, frames: list[tuple[int, bytes]], per_second: float
) -> tuple[dict[int, float], float, float]:
    """Send ``frames`` at ``per_second``; (send times by request id, send span, total span)."""
    done = b_tally.expect(len(frames))
    sent: dict[int, float] = {}
    start = time.perf_counter()
    i = 0
    n = len(frames)
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - start) * per_second) + 1)
        while i < due:
            rid, data = frames[i]
            a_conn.write(data)
            sent[rid] = time.perf_counter()
            i += 1
        delay = start + i / per_second - time.perf_counter()
        await asyncio.sleep(max(0.0, delay))
    send_span = time.perf_counter() - start
    end = await _until(done, _WAIT)
    return sent, send_span, end - start


async def _idle_connections(
    server: ServerProcess, core: ClientCore, token: str, count: int
) -> tuple[list[RawConnection], dict[str, int], float]:
    """Open ``count`` authenticated connections; (open ones, failures by kind, seconds)."""
    opened: list[RawConnection] = []
    failures: dict[str, int] = {}
    gate = asyncio.Semaphore(_CONNECT_PARALLEL)

    async def one() -> None:
        async with gate:
            try:
                opened.append(
                    await raw_connect(server.port, core.hello(token, now=time.time()), wait=60)
                )
            except Exception as exc:  # counted and reported, not raised
                kind = type(exc).__name__
                failures[kind] = failures.get(kind, 0) + 1

    start = time.perf_counter()
    await one()  # the first Hello binds the account's device key
    await asyncio.gather(*(one() for _ in range(count - 1)))
    return opened, failures, time.perf_counter() - start


async def _ping_rtts(conn: RawConnection, tally: _Tally, count: int) -> list[float]:
    """Ping round trips (ms, sorted), one per millisecond: the transport and event loops alone,
    no signature, sequencer or storage (the server's session answers Ping itself)."""
    sent: dict[int, float] = {}
    for i in range(count):
        rid = (1 << 31) + i  # clear of the ClientCore's request ids
        conn.write(Frame.build(FrameHeader(Opcode.PING, request_id=rid), b"").encode())
        sent[rid] = time.perf_counter()
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.2)
    return sorted((tally.pongs[r] - t) * 1000 for r, t in sent.items() if r in tally.pongs)


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


async def _main(quick: bool) -> Results:
    k = 1_000 if quick else CONNECTIONS_TARGET
    previous = raise_nofile(k + 2_000)  # the server process inherits the raised limit
    try:
        if nofile_soft() < k + 200:
            k = max(100, nofile_soft() - 200)
            print(f"server: RLIMIT_NOFILE too low; holding only {k} connections")
        limits = {
            "max_connections": k + 100,
            "rate_per_second": 1e9,
            "rate_burst": 1_000_000_000,
            "send_buffer": 256 * 1024 * 1024,
            "handshake_timeout": 600.0,
            "idle_timeout": 3_600.0,
        }
        accounts = ["alice", "bob", *(f"room{i}" for i in range(ROOMS))]
        results = Results()
        for database in ("sqlite", "postgresql"):
            async with ServerProcess(accounts, limits, database) as server:
                figures, room = await _sequencer(server, quick, database)
                results.figures += figures
                if database == "sqlite":
                    more = await _latency(server, quick, room)
                    results.figures += more.figures
                    results.distributions += more.distributions
        # A server of their own: memory freed by the runs above would hide what sessions take.
        async with ServerProcess(["idle"], limits) as server:
            results.figures += await _idle(server, quick, k)
        return results
    finally:
        restore_nofile(previous)


_ENGINE = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


async def _solo_rooms(server: ServerProcess, names: list[str]) -> list[tuple[ClientCore, bytes]]:
    """Each named member creates a room of its own, through the native client driver."""
    address = ServerAddress("tcp", "127.0.0.1", server.port)
    out: list[tuple[ClientCore, bytes]] = []
    for name in names:
        account = server.users[name]
        client = Client(ClientCore(account.member_id, os.urandom(32)), address, account.token)
        try:
            await client.connect()
            room = await client.create_room(name=f"bench {name}")
            await client.settle()
        finally:
            await client.close()
        out.append((client.core, room))
    return out


def _verify_rate(quick: bool) -> tuple[float, float]:
    """Ed25519 verifications on one core (one thread, best of several batches): per second of
    wall-clock time, and per second of this thread's CPU time (which other processes on the
    machine do not take away)."""
    signer = SigningKey.generate()
    signed = signer.sign(os.urandom(56))  # header[0:40] || header[48:64]
    verify_key = signer.verify_key
    per_second = rate(lambda: verify_key.verify(signed), 2_000, 5 if quick else 15)
    best = float("inf")
    for _ in range(5 if quick else 15):
        start = time.thread_time()
        for _ in range(2_000):
            verify_key.verify(signed)
        best = min(best, time.thread_time() - start)
    return per_second, 2_000 / best


_Room = tuple[ClientCore, ClientCore, bytes]  # A, B and their room


async def _sequencer(
    server: ServerProcess, quick: bool, database: str
) -> tuple[list[Figure], _Room]:
    engine = _ENGINE[database]
    m = 5_000 if quick else 20_000
    per_room = 1_000 if quick else 5_000
    warmup = 200
    limits = ", ".join(f"{key}={value:,.0f}" for key, value in server.limits.items())
    print(f"server ({engine}): separate process pid {server.pid}, TCP 127.0.0.1, durable")
    print(f"server: limits {limits}; RLIMIT_NOFILE {nofile_soft()}")

    t0 = time.perf_counter()
    a_core, b_core, room = await _setup(server)
    solos = await _solo_rooms(server, [f"room{i}" for i in range(ROOMS)])
    a_id = a_core.member_id
    a_tally, b_tally = _Tally(a_id), _Tally(a_id)
    a_token, b_token = server.users["alice"].token, server.users["bob"].token
    a_conn = await raw_connect(server.port, a_core.hello(a_token, now=time.time()), a_tally)
    b_conn = await raw_connect(server.port, b_core.hello(b_token, now=time.time()), b_tally)
    solo_conns: list[tuple[RawConnection, _Tally]] = []
    for i, (core, _) in enumerate(solos):
        tally = _Tally(core.member_id)
        token = server.users[f"room{i}"].token
        solo_conns.append(
            (await raw_connect(server.port, core.hello(token, now=time.time()), tally), tally)
        )
    t_setup = time.perf_counter()
    built = [data for _, data in _messages(a_core, room, warmup + m)]
    solo_built = [[data for _, data in _messages(core, r, per_room)] for core, r in solos]
    print(
        f"server setup: 1 room with A and B and {ROOMS} rooms of one member "
        f"{t_setup - t0:.1f} s; {len(built) + ROOMS * per_room:,} AppMessage frames built and "
        f"signed {time.perf_counter() - t_setup:.1f} s ({len(built[0])} bytes each)"
    )

    # --- one room ------------------------------------------------------------------------
    await _throughput(a_conn, a_tally, b_tally, built[:warmup])
    echoes_before, b_before, errors_before = a_tally.echoes, b_tally.echoes, a_tally.errors
    cpu_before = server.cpu_seconds()
    a_secs, b_secs = await _throughput(a_conn, a_tally, b_tally, built[warmup:])
    cpu_after = server.cpu_seconds()
    cpu_loop, cpu_threads = (
        (after - before) / m * 1e6 for after, before in zip(cpu_after, cpu_before, strict=True)
    )
    echoed = a_tally.echoes - echoes_before
    errors = a_tally.errors - errors_before
    one_room = echoed / a_secs
    print(
        f"server sequencer ({engine}) 1 room M={m:,} (after {warmup} warm-up): A got "
        f"{echoed:,} echoes in {a_secs:.2f} s, B got {b_tally.echoes - b_before:,} in "
        f"{b_secs:.2f} s; {errors} Error frames"
        + (f" (first: {a_conn.first_error})" if errors else "")
        + f"; server CPU per message {cpu_loop:.1f} us event loop + {cpu_threads:.1f} us "
        "other threads"
    )

    # --- R rooms at once, one sender each ----------------------------------------------------
    dones = [tally.expect(per_room) for _, tally in solo_conns]
    start = time.perf_counter()
    for (conn, _), frames in zip(solo_conns, solo_built, strict=True):
        conn.write(b"".join(frames))
    ends = [await _until(done, _WAIT) for done in dones]
    many_secs = max(ends) - start
    many_echoed = sum(tally.echoes for _, tally in solo_conns)
    many_errors = sum(tally.errors for _, tally in solo_conns)
    many_rooms = many_echoed / many_secs
    print(
        f"server sequencer ({engine}) {ROOMS} rooms x {per_room:,}: {many_echoed:,} echoes in "
        f"{many_secs:.2f} s; {many_errors} Error frames"
    )
    for conn in (a_conn, b_conn, *(c for c, _ in solo_conns)):
        conn.close()

    verify_rate, verify_cpu_rate = _verify_rate(quick)
    print(
        f"server: Ed25519 verify on one core {verify_rate:,.0f}/s ({1e6 / verify_rate:.1f} us; "
        f"{1e6 / verify_cpu_rate:.1f} us of CPU)"
    )
    target = f">= {THROUGHPUT_TARGET:g} x limit"
    # What 1.3 x the verify rate leaves per message on 2 cores, in CPU time on both sides: less
    # CPU than that per message is what the target needs (load on the machine skews neither).
    budget_us = CORES * 1e6 / (THROUGHPUT_TARGET * verify_cpu_rate)
    figures = [
        Figure(
            f"sequencer, 1 room, {engine}, durable, signed",
            one_room,
            "msgs/s",
            target,
            "1-core Ed25519 verify",
            verify_rate,
        ),
        Figure(
            f"sequencer, {ROOMS} rooms, {engine}, durable, signed",
            many_rooms,
            "msgs/s",
            target,
            "1-core Ed25519 verify",
            verify_rate,
        ),
        Figure(
            f"server CPU per message, 1 room, {engine}",
            cpu_loop + cpu_threads,
            "us",
            "-",
            f"{CORES} cores / 1.3 x verify CPU rate",
            budget_us,
            decimals=1,
        ),
    ]
    return figures, (a_core, b_core, room)


async def _latency(server: ServerProcess, quick: bool, setup: _Room) -> Results:
    seconds = 2.0 if quick else 10.0
    a_core, b_core, room = setup
    a_id = a_core.member_id
    a_token, b_token = server.users["alice"].token, server.users["bob"].token
    a_tally, b_tally = _Tally(a_id), _Tally(a_id, stamp=True)
    a_conn = await raw_connect(server.port, a_core.hello(a_token, now=time.time()), a_tally)
    b_conn = await raw_connect(server.port, b_core.hello(b_token, now=time.time()), b_tally)
    n_paced = int(LATENCY_RATE * seconds)
    built = _messages(a_core, room, n_paced)

    # --- native -> native latency at a paced rate ------------------------------------------
    b_tally.arrivals = {}
    sent, send_span, total_span = await _paced(a_conn, b_tally, built, LATENCY_RATE)
    arrivals = b_tally.arrivals
    latencies = sorted((arrivals[rid] - t) * 1000 for rid, t in sent.items() if rid in arrivals)
    received = len(latencies)
    p50 = _percentile(latencies, 50)
    p99 = _percentile(latencies, 99)
    worst = latencies[-1] if latencies else float("nan")
    achieved = len(sent) / send_span
    print(
        f"server latency {seconds:g} s at {LATENCY_RATE:,.0f} msgs/s: sent {len(sent):,} in "
        f"{send_span:.2f} s ({achieved:,.0f}/s), B received {received:,} "
        f"(all in by {total_span:.2f} s); p50 {p50:.2f} / p99 {p99:.2f} / "
        f"mean {statistics.fmean(latencies) if latencies else float('nan'):.2f} / "
        f"max {worst:.2f} ms; {a_tally.errors} Error frames"
    )
    rtts = await _ping_rtts(a_conn, a_tally, 500 if quick else 2_000)
    print(
        f"server latency floor: Ping->Pong round trip at 1,000/s p50 "
        f"{_percentile(rtts, 50):.2f} / p99 {_percentile(rtts, 99):.2f} ms (n={len(rtts)})"
    )
    if received < len(sent) or achieved < 0.95 * LATENCY_RATE:
        print(
            f"server latency: the server did NOT keep up with {LATENCY_RATE:,.0f} msgs/s "
            f"({received:,} of {len(sent):,} arrived)"
        )
    a_conn.close()
    b_conn.close()
    await asyncio.sleep(0.5)
    figures = [
        Figure(
            f"native->native p50 @ {LATENCY_RATE:,.0f}/s",
            p50,
            "ms",
            "-",
            "p99 target",
            LATENCY_TARGET_MS,
            decimals=2,
        ),
        Figure(
            f"native->native p99 @ {LATENCY_RATE:,.0f}/s",
            p99,
            "ms",
            f"p99 < {LATENCY_TARGET_MS:g} ms",
            "target",
            LATENCY_TARGET_MS,
            decimals=2,
        ),
    ]
    native = Distribution(
        "native->native",
        tuple(latencies),
        f"{LATENCY_RATE:,.0f} msgs/s",
        LATENCY_TARGET_MS,
        "p99 target",
    )
    return Results(figures, [native])


async def _idle(server: ServerProcess, quick: bool, k: int) -> list[Figure]:
    """K idle authenticated sessions on a fresh server, then a fresh client's Ping -> Pong."""
    idle = server.users["idle"]
    idle_core = ClientCore(idle.member_id, os.urandom(32))
    warm, _, _ = await _idle_connections(server, idle_core, idle.token, 1)  # binds the key
    await asyncio.sleep(0.5)
    rss_before = server.rss_kib()
    conns, failures, open_secs = await _idle_connections(server, idle_core, idle.token, k)
    await asyncio.sleep(1.0)
    alive = [c for c in conns if not c.lost]
    rss_after = server.rss_kib()
    per_conn = (rss_after - rss_before) / max(1, len(alive))
    refused = sum(c.errors for c in conns)
    print(
        f"server idle K={k:,}: {len(conns):,} HelloReplies in {open_secs:.1f} s "
        f"({_CONNECT_PARALLEL} handshakes in flight), {len(alive):,} still open after 1 s, "
        f"failures {failures or 'none'}, {refused} Error frames; server RSS "
        f"{rss_before / 1024:,.1f} -> {rss_after / 1024:,.1f} MiB "
        f"({per_conn:,.1f} KiB per authenticated session); server alive: {server.alive()}"
    )
    fresh_tally = _Tally(idle.member_id)
    hello_start = time.perf_counter()
    hello = idle_core.hello(idle.token, now=time.time())
    fresh = await raw_connect(server.port, hello, fresh_tally)
    hello_ms = (time.perf_counter() - hello_start) * 1000
    fresh_rtts = await _ping_rtts(fresh, fresh_tally, 1_000 if quick else 5_000)
    fresh_p99 = _percentile(fresh_rtts, 99)
    print(
        f"server fresh client beside {len(alive):,} idle sessions: connect + Hello "
        f"{hello_ms:.1f} ms; Ping->Pong at 1,000/s p50 {_percentile(fresh_rtts, 50):.2f} / "
        f"p99 {fresh_p99:.2f} / max {fresh_rtts[-1] if fresh_rtts else float('nan'):.2f} ms "
        f"(n={len(fresh_rtts)})"
    )
    fresh.close()
    for conn in conns + warm:
        conn.close()
    await asyncio.sleep(0.5)

    mem_per_10k = _mem_total_kib() / CONNECTIONS_TARGET
    return [
        Figure(
            "idle authenticated sessions held, 1 process",
            len(alive),
            "conns",
            f"{CONNECTIONS_TARGET:,}",
            "attempted",
            k,
        ),
        Figure(
            "server RSS per authenticated idle session",
            per_conn,
            "KiB",
            "-",
            "MemTotal / 10k",
            mem_per_10k,
            decimals=1,
        ),
        Figure(
            f"fresh client Ping->Pong p99 beside {len(alive):,} idle",
            fresh_p99,
            "ms",
            f"p99 < {FRESH_PONG_TARGET_MS:g} ms",
            "target",
            FRESH_PONG_TARGET_MS,
            decimals=2,
        ),
    ]


def run(quick: bool) -> Results:
    return asyncio.run(_main(quick))
