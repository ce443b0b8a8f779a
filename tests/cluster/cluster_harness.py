"""Several server processes on one PostgreSQL database (cluster mode), and clients on each.

Each node is a ``python -m kalandra_core serve`` child (``ServerProcess``) with
``server.cluster`` on; the tests kill (SIGKILL), pause (SIGSTOP) and resume (SIGCONT) them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from acceptance.acceptance_harness import Harness, ServerProcess, fresh_database

from kalandra_core.client.driver import Client, ClientError, NotYetConfirmed
from kalandra_core.storage.sql import SqlStore

LEASE = 3.0  # seconds: short, so failover tests are quick
RENEW = 1.0
FORWARD_TIMEOUT = 2.0
REBALANCE = 1.0  # seconds between a node's looks at the rooms' spread


def cluster_yaml(
    node: str, *, rebalance: bool = True, rebalance_seconds: float = REBALANCE
) -> str:
    return (
        "  cluster:\n"
        "    enabled: true\n"
        f"    node_name: {node}\n"
        f"    lease_seconds: {LEASE}\n"
        f"    renew_seconds: {RENEW}\n"
        f"    forward_timeout: {FORWARD_TIMEOUT}\n"
        f"    rebalance: {'true' if rebalance else 'false'}\n"
        f"    rebalance_seconds: {rebalance_seconds}\n"
    )


def start_node(
    tmp: Path, url: str, name: str, rebalance_seconds: float = REBALANCE
) -> ServerProcess:
    """Start (blocking) one more node on the cluster's database."""
    workdir = tmp / name
    workdir.mkdir()
    yaml = cluster_yaml(name, rebalance_seconds=rebalance_seconds)
    node = ServerProcess(workdir, url, server_yaml=yaml)
    node.start()
    return node


@contextlib.contextmanager
def cluster(tmp: Path, count: int) -> Iterator[tuple[str, list[ServerProcess]]]:
    """``count`` nodes on a fresh PostgreSQL database; stopped at the end, when none may have
    logged an error."""
    with fresh_database("postgres", tmp / "db") as url:
        nodes: list[ServerProcess] = []
        try:
            for i in range(count):
                nodes.append(start_node(tmp, url, f"node{i}"))
            yield url, nodes  # a test may append nodes it starts: they are stopped too
        finally:
            for node in nodes:
                resume(node)
                node.stop()
                node.kill()
        problems = [f"{n.workdir.name}: {line}" for n in nodes for line in n.problems()]
        assert not problems, "a node logged errors:\n" + "\n".join(problems)


def pause(node: ServerProcess) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)


def resume(node: ServerProcess) -> None:
    if node.proc is not None and node.proc.poll() is None:
        node.proc.send_signal(signal.SIGCONT)


def harnesses(nodes: list[ServerProcess], store: SqlStore, tmp: Path) -> list[Harness]:
    return [Harness(node, "tcp", store, tmp) for node in nodes]


@dataclass
class Sender:
    """Sends numbered texts one after another; a refused or unconfirmed one is sent again as a
    new message (a user pressing "retry") until the server acknowledges it."""

    client: Client
    room_id: bytes
    name: str
    acked: dict[str, int] = field(default_factory=dict)  # text -> log index
    ack_times: list[float] = field(default_factory=list)  # time.time() of each ack
    refusals: list[int] = field(default_factory=list)  # error codes seen

    async def send(self, text: str) -> int:
        while True:
            try:
                index = await self.client.send_text(self.room_id, text)
            except NotYetConfirmed:
                self.refusals.append(-1)  # its copy may still be sequenced: counted as unacked
                continue
            except ClientError as exc:
                self.refusals.append(exc.code)
                await asyncio.sleep(0.1)
                continue
            self.acked[text] = index
            self.ack_times.append(time.time())
            return index

    async def run(self, count: int, stop: asyncio.Event | None = None) -> None:
        for i in range(count):
            if stop is not None and stop.is_set():
                return
            await self.send(f"{self.name} {i}")


def lease_taken_at(nodes: list[ServerProcess], room_id: bytes, token: int) -> float | None:
    """When (time.time()) a node logged taking the room's lease with ``token``."""
    mark = f"room {room_id.hex()}: lease taken (token {token})"
    for node in nodes:
        for line in node.log.read_text(errors="replace").splitlines():
            if mark in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
    return None
