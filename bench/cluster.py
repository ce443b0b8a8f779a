"""Cluster mode: several homeserver processes on one PostgreSQL database.

Each process is ``python -m kalandra_core serve`` with ``server.cluster`` on, TCP on
127.0.0.1, on a fresh PostgreSQL database of the tests' server (``fsync`` and
``synchronous_commit`` on: every echo follows a durable commit), every frame's Ed25519
signature verified, the rate limit raised out of the way.

Figures:

* aggregate sequencer throughput with 1, 2 and 3 processes: R rooms (R = 6), each with its own
  member, created beforehand through the native client driver (not timed). Member j connects
  (raw connection) to process j mod N and writes its M pre-signed AppMessages (M = 1,000 quick
  / 5,000 full) at once; its first frame makes that process take the room's lease, so the rooms
  spread evenly and no frame is forwarded. Timed until every member has the echo (or an Error)
  of each of its frames. The same with each member on the *next* process (every frame
  forwarded to the owner and its echo fanned back over the bus) shows what routing costs. Limit:
  what this machine's cores can verify (Ed25519 ``VerifyKey.verify`` on one core, best of
  several batches, times the cores): the processes share those cores, so on this 2-core
  machine 2 and 3 processes cannot pass it and the figures show the coordination's cost, not
  its scaling.
* failover time: two processes (lease 3 s, renewal every 1 s, forward timeout 1 s); a room
  owned by process A, a member on process B sending a frame every 20 ms (forwarded to A). A is
  killed (SIGKILL); the figure is the time from the kill to the first echo of a frame sent
  after it. Limit: the lease term (target: within it).
* handover time (rebalancing): one process owns R rooms, each member on it sending a frame every
  20 ms; a second process starts and the first hands half the rooms over to it (a look every
  0.5 s). Figures: the longest handover as the giver logs it (from its worker's drain to the
  lease being the taker's), and the longest wait for an echo of a frame sent once the second
  process is up (what a sender sees: it includes the taker loading the room). Limit: the lease
  term (a handover must not wait for a lease to run out).

The throughput runs turn rebalancing off: their rooms are placed where the figure needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from nacl.signing import SigningKey

from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.proto import Frame, Opcode
from kalandra_core.storage.sql import SqlStore

from ._server_proc import PG_ADMIN_DSN, raw_connect
from .common import Figure, Results, rate

ROOMS = 6
CORES = min(2, os.cpu_count() or 1)
FAILOVER_LEASE = 3.0
HANDOVER_LEASE = 3.0
_HANDED = re.compile(r"handed over to \S+ in ([0-9.]+) ms")
_WAIT = 120.0
_LIMITS = {"rate_per_second": 1e9, "rate_burst": 1_000_000_000}


@dataclass
class _Node:
    name: str
    tmp: Path
    url: str
    cluster: dict[str, Any]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None)

    async def start(self) -> None:
        ready = self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        self.port = int(ready.read_text().split()[0])

    def _spawn(self) -> Path:
        config = {
            "database": {"url": self.url},
            "server": {
                "tcp_host": "127.0.0.1",
                "tcp_port": 0,
                "quic_port": None,
                "data_dir": str(self.tmp),
                "limits": _LIMITS,
                "cluster": {"enabled": True, "node_name": self.name, **self.cluster},
            },
        }
        path = self.tmp / "config.yaml"
        path.write_text(json.dumps(config))
        ready = self.tmp / "ready"
        self._log = open(self.tmp / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kalandra_core",
                "serve",
                "-c",
                str(path),
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return ready

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        text = (self.tmp / "server.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _cluster(count: int, cluster: dict[str, Any], started: int | None = None) -> Any:
    """``count`` nodes on a fresh database: (url, nodes); the first ``started`` (None: all) are
    running, the caller starts the others."""
    name = f"kalandra_bench_{secrets.token_hex(6)}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="kalandra-bench-cluster-"))
    nodes: list[_Node] = []
    try:
        store = await SqlStore.open(url)  # migrates once, before the nodes start
        await store.close()
        for i in range(count):
            (tmp / f"node{i}").mkdir()
            nodes.append(_Node(f"node{i}", tmp / f"node{i}", url, cluster))
        await asyncio.gather(*(node.start() for node in nodes[:started]))
        yield url, nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class _Member:
    core: ClientCore
    token: str
    room: bytes


async def _members(url: str, port: int, count: int) -> list[_Member]:
    """``count`` members, each the creator of a room of its own (through the client driver)."""
    store = await SqlStore.open(url, migrate=False)
    out: list[_Member] = []
    try:
        for i in range(count):
            account = await store.create_member(f"bench-{i}-{secrets.token_hex(3)}")
            token = await store.issue_token(account.member_id)
            client = Client(
                ClientCore(account.member_id, os.urandom(32)),
                ServerAddress("tcp", "127.0.0.1", port),
                token,
            )
            try:
                await client.connect()
                room = await client.create_room(name=f"bench {i}")
            finally:
                await client.close()
            out.append(_Member(client.core, token, room))
    finally:
        await store.close()
    return out


def _frames(member: _Member, count: int) -> list[bytes]:
    content = Content(body="benchmark message, about one line of chat text")
    built = [
        member.core.send_message(member.room, content, now=time.time())[1] for _ in range(count)
    ]
    member.core.outbox.clear()  # never sent through the driver
    return built


class _Echoes:
    """Counts one member's echoes and errors; ``done`` once ``expected`` are in."""

    def __init__(self, sender: int, expected: int) -> None:
        self.sender = sender
        self.expected = expected
        self.count = 0
        self.errors = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.arrivals: dict[int, float] = {}

    def __call__(self, frame: Frame) -> None:
        h = frame.header
        if h.opcode == Opcode.APP_MESSAGE and h.sender_id == self.sender:
            self.count += 1
            self.arrivals.setdefault(h.request_id, time.perf_counter())
        elif h.opcode == Opcode.ERROR:
            self.errors += 1
        else:
            return
        if self.count + self.errors >= self.expected and not self.done.done():
            self.done.set_result(time.perf_counter())


async def _throughput(processes: int, per_room: int, *, forwarded: bool) -> tuple[float, int]:
    """(frames per second over all rooms, errors)."""
    settings = {"lease_seconds": 10, "renew_seconds": 3, "rebalance": False}
    async with _cluster(processes, settings) as (url, nodes):
        members = await _members(url, nodes[0].port, ROOMS)
        tallies, conns, batches = [], [], []
        for j, member in enumerate(members):
            node = nodes[(j + (1 if forwarded else 0)) % processes]
            tally = _Echoes(member.core.member_id, per_room)
            hello = member.core.hello(member.token, now=time.time())
            conns.append(await raw_connect(node.port, hello, tally))
            tallies.append(tally)
            batches.append(b"".join(_frames(member, per_room)))
        if forwarded and processes > 1:
            # The owner is the process after the member's: it takes each lease first.
            for j, member in enumerate(members):
                owner = nodes[j % processes]
                warm = _Echoes(member.core.member_id, 1)
                conn = await raw_connect(
                    owner.port, member.core.hello(member.token, now=time.time()), warm
                )
                conn.write(_frames(member, 1)[0])
                await asyncio.wait_for(warm.done, 30)
                conn.close()
        start = time.perf_counter()
        for conn, batch in zip(conns, batches, strict=True):
            conn.write(batch)
        ends = await asyncio.wait_for(asyncio.gather(*(t.done for t in tallies)), _WAIT)
        for conn in conns:
            conn.close()
        elapsed = max(ends) - start
        return ROOMS * per_room / elapsed, sum(t.errors for t in tallies)


async def _failover() -> float:
    """Seconds from SIGKILL of a busy room's owner to the first echo of a frame sent after."""
    settings = {"lease_seconds": FAILOVER_LEASE, "renew_seconds": 1.0, "forward_timeout": 1.0}
    async with _cluster(2, settings) as (url, nodes):
        (member,) = await _members(url, nodes[0].port, 1)
        owner_echo = _Echoes(member.core.member_id, 1)
        hello = member.core.hello(member.token, now=time.time())
        owner_conn = await raw_connect(nodes[0].port, hello, owner_echo)
        owner_conn.write(_frames(member, 1)[0])  # node0 takes the lease
        await asyncio.wait_for(owner_echo.done, 30)
        frames = _frames(member, 1_000)
        tally = _Echoes(member.core.member_id, len(frames))
        conn = await raw_connect(
            nodes[1].port, member.core.hello(member.token, now=time.time()), tally
        )
        sent: dict[int, float] = {}
        killed_at = 0.0
        first_after: float | None = None
        for i, data in enumerate(frames):
            request_id = Frame.decode(data).header.request_id
            sent[request_id] = time.perf_counter()
            conn.write(data)
            if i == 50:
                nodes[0].kill()
                killed_at = time.perf_counter()
            await asyncio.sleep(0.02)
            if killed_at:
                after = [t for r, t in tally.arrivals.items() if sent.get(r, 0) > killed_at]
                if after:
                    first_after = min(after)
                    break
            if killed_at and time.perf_counter() - killed_at > 30:
                break
        conn.close()
        owner_conn.close()
        if first_after is None:
            raise RuntimeError("no frame acknowledged within 30 s of the kill")
        return first_after - killed_at


async def _handover() -> tuple[float, float]:
    """(longest handover as logged, longest echo wait of a frame sent once the second process
    was up), both in seconds."""
    settings = {
        "lease_seconds": HANDOVER_LEASE,
        "renew_seconds": 1.0,
        "forward_timeout": 1.0,
        "rebalance_seconds": 0.5,
    }
    async with _cluster(2, settings, started=1) as (url, nodes):
        members = await _members(url, nodes[0].port, ROOMS)
        tallies, conns, frames = [], [], []
        for member in members:
            tally = _Echoes(member.core.member_id, 0)
            hello = member.core.hello(member.token, now=time.time())
            conns.append(await raw_connect(nodes[0].port, hello, tally))
            tallies.append(tally)
            frames.append(_frames(member, 2_000))
        sent: list[dict[int, float]] = [{} for _ in members]
        stop = asyncio.Event()

        async def traffic() -> None:
            for i in range(2_000):
                if stop.is_set():
                    return
                for j, conn in enumerate(conns):
                    sent[j][Frame.decode(frames[j][i]).header.request_id] = time.perf_counter()
                    conn.write(frames[j][i])
                await asyncio.sleep(0.02)

        def handed() -> list[float]:
            log = (nodes[0].tmp / "server.log").read_text(errors="replace")
            return [float(ms) / 1000 for ms in _HANDED.findall(log)]

        flowing = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        await nodes[1].start()
        joined_at = time.perf_counter()
        deadline = joined_at + 30
        while len(handed()) < ROOMS // 2 and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # (reading the giver's log)
        await asyncio.sleep(1.0)  # traffic to the new owner too
        stop.set()
        await flowing
        deadline = time.perf_counter() + _WAIT
        while any(t.count + t.errors < len(s) for t, s in zip(tallies, sent, strict=True)):
            if time.perf_counter() > deadline:
                raise RuntimeError("echoes missing after the handovers")
            await asyncio.sleep(0.05)
        for conn in conns:
            conn.close()
        errors = sum(t.errors for t in tallies)
        if errors:
            raise RuntimeError(f"{errors} frames refused during the handovers")
        waits = [
            tally.arrivals[r] - at
            for tally, times in zip(tallies, sent, strict=True)
            for r, at in times.items()
            if at >= joined_at
        ]
        took = handed()
        if not took:
            raise RuntimeError("no room was handed over")
        print(f"cluster: {len(took)} of {ROOMS} rooms handed over")
        return max(took), max(waits)


def _verify_rate() -> float:
    signer = SigningKey.generate()
    signed = signer.sign(os.urandom(56))
    key = signer.verify_key
    return rate(lambda: key.verify(signed), 2_000, 5)


async def _main(quick: bool) -> Results:
    per_room = 1_000 if quick else 5_000
    verify = _verify_rate()
    limit = CORES * verify
    limit_name = f"Ed25519 verify x {CORES} cores"
    results = Results()
    print(f"cluster: {ROOMS} rooms x {per_room:,} frames; one-core verify {verify:,.0f}/s")
    for processes in (1, 2, 3):
        started = time.perf_counter()
        value, errors = await _throughput(processes, per_room, forwarded=False)
        took = time.perf_counter() - started
        print(
            f"cluster: {processes} process(es): {value:,.0f} msgs/s, {errors} errors "
            f"({took:.0f} s with start-up)"
        )
        results.figures.append(
            Figure(
                f"cluster sequencer, {processes} process{'es' if processes > 1 else ''} "
                f"({ROOMS} rooms)",
                value,
                "msgs/s",
                "-",
                limit_name,
                limit,
            )
        )
    value, errors = await _throughput(2, per_room, forwarded=True)
    print(f"cluster: 2 processes, every frame forwarded: {value:,.0f} msgs/s, {errors} errors")
    results.figures.append(
        Figure(
            f"cluster sequencer, 2 processes, all forwarded ({ROOMS} rooms)",
            value,
            "msgs/s",
            "-",
            limit_name,
            limit,
        )
    )
    failover = await _failover()
    print(f"cluster: failover {failover:.2f} s after kill -9 (lease {FAILOVER_LEASE:g} s)")
    results.figures.append(
        Figure(
            "cluster failover (kill -9 -> first new ack)",
            failover,
            "s",
            "<= lease",
            "lease term",
            FAILOVER_LEASE,
            decimals=2,
        )
    )
    handover, wait = await _handover()
    print(
        f"cluster: handover {handover * 1000:.1f} ms at most; longest echo wait meanwhile "
        f"{wait * 1000:.0f} ms (lease {HANDOVER_LEASE:g} s)"
    )
    results.figures.append(
        Figure(
            "cluster handover (rebalancing, longest)",
            handover,
            "s",
            "<< lease",
            "lease term",
            HANDOVER_LEASE,
            decimals=3,
        )
    )
    results.figures.append(
        Figure(
            "cluster echo wait while rooms are handed over (longest)",
            wait,
            "s",
            "<< lease",
            "lease term",
            HANDOVER_LEASE,
            decimals=3,
        )
    )
    return results


def run(quick: bool) -> Results:
    return asyncio.run(_main(quick))
