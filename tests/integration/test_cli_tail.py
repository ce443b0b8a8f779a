"""``kalandra tail`` (a real subprocess) outlives restarts of a real server process: it says on
stderr that it is disconnected and when it is back, and its stdout shows every message another
member sent before, while the server was down and just after it came back, exactly once and in
log order. The server stops cleanly (SIGTERM) in one round and crashes (SIGKILL) in the next,
and comes back on the same port and database each time."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.storage.sql import SqlStore

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0  # any single wait (a failure, never a measurement); generous for a loaded machine
LINE = re.compile(r"^#(\d+) \S+ \S+ <(\d+)> (.*)$")


class ServerProcess:
    """``kalandra serve`` as a child process, restartable on the same ports and database."""

    def __init__(self, workdir: Path, database: str) -> None:
        self.workdir, self.database = workdir, database
        self.ready = workdir / "ready"
        self.tcp_port = self.quic_port = 0  # ephemeral at the first start, then kept
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        config = self.workdir / "server.yaml"
        config.write_text(
            f'database: {{url: "{self.database}"}}\n'
            f"server: {{tcp_port: {self.tcp_port}, quic_port: {self.quic_port},"
            f' data_dir: "{self.workdir}"}}\n',
            encoding="utf-8",
        )
        self.ready.unlink(missing_ok=True)
        with open(self.workdir / "server.log", "ab") as log:  # noqa: ASYNC230 (opening a log)
            self.proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "kalandra_core", "serve", "-c", str(config)),
                *("--ready-file", str(self.ready)),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with asyncio.timeout(WAIT):
            while not (text := self._ready_text()).endswith("\n"):
                assert self.proc.returncode is None, "the server exited at start"
                await asyncio.sleep(0.05)
        self.tcp_port, self.quic_port = (int(p) for p in text.split())

    def _ready_text(self) -> str:
        try:
            return self.ready.read_text(encoding="ascii")
        except FileNotFoundError:
            return ""

    async def stop(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await asyncio.wait_for(self.proc.wait(), WAIT)


class Output:
    """The lines a stream gave so far, and a way to wait for one."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._changed.set()

    def count(self, match: Callable[[str], bool]) -> int:
        return sum(1 for line in self.lines if match(line))

    async def until(self, match: Callable[[str], bool], at_least: int = 1) -> None:
        async with asyncio.timeout(WAIT):
            while self.count(match) < at_least:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def server(db_url: str, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(tmp_path, db_url)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(signal.SIGKILL)


async def kalandra(state: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "kalandra_core", args[0], "--state", str(state), *args[1:]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, (args, out, err)
    return out.decode()


async def test_tail_reconnects_after_server_restarts_and_misses_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    url = f"tcp://127.0.0.1:{server.tcp_port}"
    store = await SqlStore.open(server.database, migrate=False)
    try:
        members = [await store.create_member(name) for name in ("alice", "bob")]
        alice_token, bob_token = [await store.issue_token(m.member_id) for m in members]
    finally:
        await store.close()
    alice_id = members[0].member_id
    bob_state = tmp_path / "bob.db"
    await kalandra(bob_state, "login", "--server", url, "--token", bob_token)

    # Alice: another native client (the library, reconnecting by itself), in this process.
    alice = Client(
        ClientCore(alice_id, os.urandom(32)),
        ServerAddress.parse(url),
        alice_token,
        request_timeout=WAIT,
        reconnect_max_delay=1.0,
    )
    await asyncio.wait_for(alice.connect(), WAIT)
    room = await alice.create_room(name="tail")
    await alice.invite(room, [members[1].member_id])
    assert room.hex() in await kalandra(bob_state, "join")

    tail = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "kalandra_core", "tail", room.hex(), "--state", str(bob_state)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tail.stdout is not None
    assert tail.stderr is not None
    out, err = Output(tail.stdout), Output(tail.stderr)
    sent: dict[str, int] = {}  # body -> log index, as the server acknowledged it

    async def send(*bodies: str) -> None:
        # All queued at once, in this order (the client's outbox keeps it), then awaited.
        tasks = [asyncio.create_task(alice.send_text(room, body)) for body in bodies]
        for body, index in zip(bodies, await asyncio.gather(*tasks), strict=True):
            sent[body] = index

    def shown(body: str) -> Callable[[str], bool]:
        return lambda line: line.endswith(f"<{alice_id}> {body}")

    try:
        await send("before-1", "before-2")
        await out.until(shown("before-2"))
        for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
            await server.stop(sig)
            await err.until(
                lambda line: line.startswith(f"kalandra: disconnected from {url}"), round_
            )
            # Sent while the server is down: they wait in Alice's outbox.
            down = asyncio.create_task(send(*(f"r{round_}-down-{i}" for i in range(3))))
            await asyncio.sleep(0)
            await server.start()  # the same port and database
            after = asyncio.create_task(send(*(f"r{round_}-after-{i}" for i in range(3))))
            await asyncio.wait_for(asyncio.gather(down, after), WAIT)
            await err.until(lambda line: line == f"kalandra: reconnected to {url}", round_)
        await send("end")
        await out.until(shown("end"))
    finally:
        if tail.returncode is None:
            tail.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(tail.wait(), WAIT)
        await alice.close()

    printed = [m.groups() for line in out.lines if (m := LINE.match(line))]
    from_alice = [(int(index), body) for index, sender, body in printed if int(sender) == alice_id]
    expected = sorted((index, body) for body, index in sent.items())
    assert from_alice == expected  # every message, exactly once, in log order
    assert len(expected) == 2 + 2 * 6 + 1
    assert code == 0  # Ctrl-C ends a tail quietly
