"""The acceptance tests' tools: the server as a child process, raw protocol connections,
accounts and native clients (with persistent ``ClientState``), and small waiting helpers.

Every wait has a timeout (``within``); nothing asserts on timing. The fixtures that use these
live in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from helpers.native import TIMEOUT, next_message, within
from nacl.signing import SigningKey

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.state import ClientState
from kalandra_core.proto import (
    ErrorPayload,
    Frame,
    FrameHeader,
    HelloReply,
    Opcode,
    ProtocolError,
    SyncRequest,
    SyncResponse,
    decode_payload,
    hlc,
)
from kalandra_core.proto.hello_proof import signed_hello
from kalandra_core.storage.sql import SqlStore
from kalandra_core.transport.interface import FrameSink
from kalandra_core.transport.quic import connect_quic
from kalandra_core.transport.tcp import connect_tcp

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
PG_ADMIN_DSN = os.environ.get("KALANDRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[2]


# --- the server process -------------------------------------------------------------------------


class ServerProcess:
    """``python -m kalandra_core serve`` as a child process; its log goes to a file."""

    def __init__(self, workdir: Path, database: str, *, server_yaml: str = "") -> None:
        self.workdir = workdir
        self.database = database
        self.server_yaml = server_yaml  # more of the ``server`` section, indented two spaces
        self.config = workdir / "server.yaml"
        self.ready = workdir / "ready"
        self.log = workdir / "server.log"
        self.tcp_port = 0
        self.quic_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def certificate(self) -> bytes:
        return (self.workdir / "server.crt").read_bytes()

    def address(self, transport: str) -> ServerAddress:
        port = self.tcp_port if transport == "tcp" else self.quic_port
        return ServerAddress(transport, HOST, port)

    def start(self) -> None:
        """Start and wait (blocking) until it listens."""
        self._spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._ready(deadline):
            time.sleep(0.02)

    async def restart(self) -> None:
        """Start again on the same database and ports; the event loop runs meanwhile."""
        self._spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self._ready(deadline):
                return
            await asyncio.sleep(0.02)

    def _spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.config.write_text(
            f'database: {{url: "{self.database}"}}\n'
            "server:\n"
            f"  tcp_port: {self.tcp_port}\n"
            f"  quic_port: {self.quic_port}\n"
            f'  data_dir: "{self.workdir}"\n' + self.server_yaml,
            encoding="utf-8",
        )
        self.ready.unlink(missing_ok=True)
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"===== start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "kalandra_core", "serve"),
                    *("-c", str(self.config), "--ready-file", str(self.ready)),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _ready(self, deadline: float) -> bool:
        assert self.proc is not None
        ports = self._ports()
        if ports is not None:
            self.tcp_port, self.quic_port = ports
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
        if time.monotonic() > deadline:
            self.kill()
            raise RuntimeError(f"server did not become ready:\n{self.tail()}")
        return False

    def _ports(self) -> tuple[int, int] | None:
        try:
            text = self.ready.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        if not text.endswith("\n"):
            return None  # still being written
        tcp, quic = (int(p) for p in text.split())
        return tcp, quic

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STARTUP_TIMEOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def problems(self) -> list[str]:
        """Log lines that show something went wrong inside the server."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        marks = (" ERROR ", " CRITICAL ", "Traceback")
        return [line for line in text.splitlines() if any(m in line for m in marks)]

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.contextmanager
def running_server(workdir: Path, database: str) -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, database)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.kill()
    problems = server.problems()
    assert not problems, "the server logged errors:\n" + "\n".join(problems)


# --- databases ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'kalandra.db'}"
        return
    name = f"kalandra_accept_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- raw connections ----------------------------------------------------------------------------


class RawConnection:
    """A bare protocol session: send hand-built frames, see every frame the server sends."""

    def __init__(self) -> None:
        self.sink: FrameSink | None = None
        self.frames: list[Frame] = []
        self._arrived = asyncio.Event()
        self.lost: str | None = None

    # transport.Session
    def frame_received(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._arrived.set()

    def protocol_error(self, error: ProtocolError) -> None:
        self.lost = f"protocol error: {error}"
        self._arrived.set()

    def connection_lost(self, reason: str) -> None:
        self.lost = reason
        self._arrived.set()

    @classmethod
    async def open(cls, server: ServerProcess, transport: str) -> RawConnection:
        conn = cls()
        if transport == "tcp":
            conn.sink = await within(connect_tcp(HOST, server.tcp_port, lambda _s: conn))
        else:
            conn.sink = await within(
                connect_quic(
                    HOST, server.quic_port, lambda _s: conn, ca_certificate=server.certificate
                )
            )
        return conn

    def send(self, data: bytes) -> None:
        assert self.sink is not None
        assert self.sink.send(data), "send buffer full"

    async def wait_frame(self, match: Callable[[Frame], bool]) -> Frame:
        async def wait() -> Frame:
            seen = 0
            while True:
                for frame in self.frames[seen:]:
                    if match(frame):
                        return frame
                seen = len(self.frames)
                if self.lost is not None:
                    raise ConnectionError(f"connection lost: {self.lost}")
                self._arrived.clear()
                await self._arrived.wait()

        return await within(wait())

    async def request(self, data: bytes, *opcodes: Opcode) -> Frame:
        """Send a frame; the answer is the frame of one of ``opcodes`` with its request id."""
        request_id = Frame.decode(data).header.request_id
        self.send(data)
        return await self.wait_frame(
            lambda f: f.header.request_id == request_id and f.header.opcode in opcodes
        )

    async def hello(self, token: str, signing_key: bytes) -> HelloReply:
        key = SigningKey(signing_key)
        stamp = hlc.pack(int(time.time() * 1000), 0)
        hello = signed_hello(token.encode(), key, stamp)
        header = FrameHeader(
            Opcode.HELLO, request_id=secrets.randbits(31) | 1, hlc_timestamp=stamp
        )
        reply = await self.request(
            Frame.build(header, hello).encode(), Opcode.HELLO_REPLY, Opcode.ERROR
        )
        payload = decode_payload(reply.header.opcode, reply.payload)
        assert isinstance(payload, HelloReply), payload
        return payload

    async def sync_all(self, member_id: int, room_id: bytes) -> list[Frame]:
        """The whole log of a room, page by page, as SyncResponses deliver it."""
        out: list[Frame] = []
        while True:
            request = SyncRequest(from_log_index=len(out), limit=500)
            header = FrameHeader(
                Opcode.SYNC_REQUEST,
                request_id=secrets.randbits(31) | 1,
                room_id=int.from_bytes(room_id, "big"),
                sender_id=member_id,
            )
            reply = await self.request(
                Frame.build(header, request).encode(), Opcode.SYNC_RESPONSE, Opcode.ERROR
            )
            payload = decode_payload(reply.header.opcode, reply.payload)
            if isinstance(payload, ErrorPayload):
                raise AssertionError(f"sync refused: {payload}")
            assert isinstance(payload, SyncResponse)
            out += [Frame.decode(bytes(data)) for data in payload.frames]
            if not payload.has_more:
                return out
            assert payload.frames, "has_more without frames"

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close("test done")


# --- accounts and clients -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    name: str
    member_id: int
    token: str


class Harness:
    def __init__(self, server: ServerProcess, transport: str, store: SqlStore, tmp: Path) -> None:
        self.server = server
        self.transport = transport
        self.store = store
        self.tmp = tmp
        self.clients: list[Client] = []
        self.states: list[ClientState] = []
        self.raws: list[RawConnection] = []
        self.keepalive: float | None = 15.0  # the Client default; see Client.keepalive

    async def user(self, name: str) -> User:
        account = await self.store.create_member(f"{name}-{secrets.token_hex(4)}")
        token = await self.store.issue_token(account.member_id)
        return User(name, account.member_id, token)

    async def users(self, *names: str) -> list[User]:
        return [await self.user(name) for name in names]

    def _state(self, user: User) -> tuple[ClientCore, ClientState]:
        """The user's device: identity, rooms, key packages and outbox in a ClientState file
        (restored when it exists, so a new Client continues where the last one stopped)."""
        state = ClientState(self.tmp / f"client-{user.member_id}.db")
        self.states.append(state)
        identity = state.load_identity()
        if identity is None:
            signing_key = os.urandom(32)
            state.save_identity(
                server=str(self.server.address(self.transport)),
                token=user.token,
                member_id=user.member_id,
                signing_key=signing_key,
            )
        else:
            signing_key = identity.signing_key
        core = ClientCore(user.member_id, signing_key)
        state.load_into(core)
        return core, state

    def client(self, user: User) -> Client:
        """A new Client object for ``user`` (not connected yet)."""
        core, state = self._state(user)
        ca = self.server.certificate if self.transport == "quic" else None
        client = Client(
            core,
            self.server.address(self.transport),
            user.token,
            state=state,
            ca_certificate=ca,
            request_timeout=TIMEOUT,
            keepalive=self.keepalive,
        )
        self.clients.append(client)
        return client

    async def connect(self, user: User, *, key_packages: int = 2) -> Client:
        client = self.client(user)
        await within(client.connect())
        if key_packages:
            await within(client.publish_key_packages(key_packages))
        return client

    async def raw(self, user: User, signing_key: bytes) -> RawConnection:
        conn = await RawConnection.open(self.server, self.transport)
        self.raws.append(conn)
        await conn.hello(user.token, signing_key)
        return conn

    async def close(self) -> None:
        for conn in self.raws:
            conn.close()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await within(client.close())
        await asyncio.sleep(0)  # let transports run their close callbacks
        for state in self.states:
            state.close()


# --- helpers for the scenarios ------------------------------------------------------------------


async def message_from(client: Client, sender: int, body: str) -> ev.Message:
    return await next_message(client, lambda m: m.sender_id == sender and m.content.body == body)


def drain_events(client: Client) -> list[ev.Event]:
    out: list[ev.Event] = []
    while not client.events.empty():
        out.append(client.events.get_nowait())
    return out


def failures(client: Client) -> list[ev.Event]:
    """What the user would see as an error: Failed and Undecryptable events."""
    return [e for e in drain_events(client) if isinstance(e, ev.Failed | ev.Undecryptable)]


async def joined(client: Client, room_id: bytes) -> None:
    """Wait until ``client`` joined ``room_id`` from its Welcome and applied the log after it."""
    got = await within(client.joined.get())
    assert got == room_id
    await within(client.settle())


async def shared_room(harness: Harness, owner: Client, *members: tuple[Client, User]) -> bytes:
    """``owner`` creates a room and adds ``members`` (one commit); they join from the Welcome."""
    room_id = await within(owner.create_room(name="acceptance"))
    await within(owner.invite(room_id, [user.member_id for _, user in members]))
    for client, _ in members:
        await joined(client, room_id)
    return room_id


def error_payload(frame: Frame) -> ErrorPayload:
    assert frame.header.opcode == Opcode.ERROR, frame.header
    payload = decode_payload(Opcode.ERROR, frame.payload)
    assert isinstance(payload, ErrorPayload)
    return payload


def assert_dense(frames: list[Frame]) -> None:
    indexes = [f.header.context_id for f in frames]
    assert indexes == list(range(len(frames))), f"log indexes not dense: {indexes}"


def record_frames(client: Client, opcode: Opcode) -> list[Frame]:
    """Spy on the frames of ``opcode`` a client receives (it still handles them as usual)."""
    seen: list[Frame] = []
    receive = client.core.receive

    def spy(frame: Frame, *, now: float) -> list[ev.Event]:
        if frame.header.opcode == opcode:
            seen.append(frame)
        return receive(frame, now=now)

    client.core.receive = spy  # type: ignore[method-assign]
    return seen
