"""Helpers for the server benchmark: the homeserver in its own process, raw TCP connections.

:class:`ServerProcess` runs ``python -m kalandra_core serve`` on a fresh database, an SQLite file
in a temporary directory or a new database on the PostgreSQL server of ``KALANDRA_BENCH_PG``
(the one the tests use by default; accounts created beforehand with :class:`SqlStore`), waits
for its ready file, and always terminates it and removes the directory and the database.
:class:`RawConnection` is the cheapest possible client: an asyncio Protocol with a
:class:`FrameDecoder` that authenticates with a Hello and then hands every frame to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalandra_core.proto import (
    ErrorPayload,
    Frame,
    FrameDecoder,
    HelloReply,
    Opcode,
    PayloadDecodeError,
    decode_payload,
)
from kalandra_core.storage.sql import SqlStore

_STOP_GRACE = 15.0
# An administrative connection to the PostgreSQL server the benchmark makes its database on.
PG_ADMIN_DSN = os.environ.get("KALANDRA_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True, slots=True)
class Account:
    member_id: int
    token: str


@dataclass(slots=True)
class ServerProcess:
    """A homeserver process; use as ``async with ServerProcess(...) as server``."""

    accounts: list[str]
    limits: dict[str, Any] = field(default_factory=dict)
    database: str = "sqlite"  # or "postgresql"
    tmp: Path = field(init=False)
    url: str = field(init=False, default="")
    _pg_name: str | None = field(init=False, default=None)
    port: int = field(init=False, default=0)
    users: dict[str, Account] = field(init=False, default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _log: Any = field(init=False, default=None)

    async def __aenter__(self) -> ServerProcess:
        self.tmp = Path(tempfile.mkdtemp(prefix="kalandra-bench-"))
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._stop()
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self._pg_name is not None:
                await _pg_admin(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def _start(self) -> None:
        if self.database == "postgresql":
            self._pg_name = f"kalandra_bench_{secrets.token_hex(6)}"
            await _pg_admin(f'CREATE DATABASE "{self._pg_name}"')
            url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{self._pg_name}"
        else:
            url = f"sqlite:///{self.tmp / 'kalandra.db'}"
        self.url = url
        store = await SqlStore.open(url)
        try:
            for name in self.accounts:
                account = await store.create_member(name)
                token = await store.issue_token(account.member_id)
                self.users[name] = Account(account.member_id, token)
        finally:
            await store.close()
        # JSON is YAML: no YAML writer needed.
        config = {
            "database": {"url": url},
            "server": {
                "tcp_host": "127.0.0.1",
                "tcp_port": 0,
                "quic_port": None,
                "data_dir": str(self.tmp),
                "limits": self.limits,
            },
        }
        ready = self.tmp / "ready"
        self._launch(config, ready)
        assert self._proc is not None
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().endswith("\n")):
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"server exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 60 s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        self.port = int(ready.read_text().split()[0])

    def _launch(self, config: dict[str, Any], ready: Path) -> None:
        config_path = self.tmp / "config.yaml"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        self._log = open(self.tmp / "server.log", "wb")  # noqa: SIM115 (closed in __aexit__)
        # The child inherits this process's RLIMIT_NOFILE (raised by the caller first).
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kalandra_core",
                "serve",
                "-c",
                str(config_path),
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is not None:
            print(f"server: the process had exited ({proc.returncode}); log:\n{self.log_tail()}")
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            print(f"server: no exit {_STOP_GRACE:g} s after SIGTERM; killed")
            proc.kill()
            proc.wait()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.tmp / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) the server has used: (its event loop's thread, all its
        other threads: the verify pool, the SQLite writer, the database driver's)."""
        tick = os.sysconf("SC_CLK_TCK")
        main = others = 0.0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # a thread that just ended
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            if task.name == str(self.pid):
                main += used
            else:
                others += used
        return main, others

    def rss_kib(self) -> int:
        """The server's resident set (VmRSS), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc/PID/status")


class RawConnection(asyncio.Protocol):
    """One TCP connection that decodes frames and passes them to ``on_frame``.

    Error frames are counted (and the first message kept) before ``on_frame`` sees them.
    """

    def __init__(self, on_frame: Callable[[Frame], None] | None = None) -> None:
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.hello: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.errors = 0
        self.first_error = ""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            opcode = frame.header.opcode
            if opcode == Opcode.ERROR:
                self.errors += 1
                if not self.first_error:
                    self.first_error = _error_text(frame)
                if not self.hello.done():
                    self.hello.set_exception(RuntimeError(f"Hello refused: {self.first_error}"))
                    continue
            elif opcode == Opcode.HELLO_REPLY and not self.hello.done():
                self.hello.set_result(frame)
                continue
            if self.on_frame is not None:
                self.on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"connection lost before HelloReply: {exc}"))

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def raw_connect(
    port: int,
    hello: bytes,
    on_frame: Callable[[Frame], None] | None = None,
    *,
    wait: float = 30.0,
) -> RawConnection:
    """Connect to 127.0.0.1:``port``, send the Hello frame ``hello``, wait for HelloReply."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: RawConnection(on_frame), "127.0.0.1", port), wait
    )
    try:
        conn.write(hello)
        reply = await asyncio.wait_for(conn.hello, wait)
        payload = decode_payload(Opcode.HELLO_REPLY, reply.payload)
        if not isinstance(payload, HelloReply):
            raise RuntimeError("HelloReply payload did not decode")
    except BaseException:
        conn.close()
        raise
    return conn


async def _pg_admin(statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


def _error_text(frame: Frame) -> str:
    try:
        payload = decode_payload(Opcode.ERROR, frame.payload)
    except PayloadDecodeError:
        return "(undecodable Error frame)"
    if isinstance(payload, ErrorPayload):
        return f"code {payload.code}: {payload.message}"
    return "(Error frame)"


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit).

    Returns the previous (soft, hard) pair, for :func:`restore_nofile`.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, hard


def restore_nofile(previous: tuple[int, int]) -> None:
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, previous)


def nofile_soft() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


__all__ = [
    "Account",
    "RawConnection",
    "ServerProcess",
    "nofile_soft",
    "raise_nofile",
    "raw_connect",
    "restore_nofile",
]
