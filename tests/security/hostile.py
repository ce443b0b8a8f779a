"""Tools of the hostile-input tests: accounts, a raw protocol connection that sends whatever
bytes it is told to (forged, replayed, malformed), native clients, and a snapshot of every row
of the server's SQLite database to prove that a refused frame left nothing behind.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers.native import Account as Account
from helpers.native import account as account
from nacl.signing import SigningKey
from sqlalchemy.ext.asyncio import create_async_engine

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.mls.group import Handshake
from kalandra_core.proto import (
    EncryptedMessage,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameHeader,
    HelloReply,
    Opcode,
    Payload,
    ProtocolError,
    decode_payload,
    hlc,
    sign_header,
)
from kalandra_core.proto.hello_proof import signed_hello
from kalandra_core.server.app import RunningServer
from kalandra_core.storage import schema
from kalandra_core.storage.urls import sqlalchemy_url
from kalandra_core.transport.interface import FrameSink
from kalandra_core.transport.tcp import connect_tcp

TIMEOUT = 15.0  # any single wait (a loaded 2-core machine); never a timing assertion


async def client(
    server: RunningServer, who: Account, handshake: Handshake = Handshake.PUBLIC
) -> Client:
    """A real native client (the library's own), logged in as ``who`` over TCP; its rooms
    take handshakes as ``handshake`` (public: the server follows the roster)."""
    assert server.tcp_port is not None
    c = Client(
        ClientCore(who.member_id, bytes(who.key), handshake=handshake),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        who.token,
        reconnect=False,
    )
    await c.connect()
    return c


def dummy_envelope(epoch: int) -> EncryptedMessage:
    """A well-formed AppMessage payload: the server never decrypts, it only checks the shape."""
    return EncryptedMessage(
        epoch=epoch, sender_index=0, generation=0, nonce=bytes(24), ciphertext=bytes(17)
    )


class Raw:
    """A bare protocol connection: frames (or any bytes) out by hand, frames in collected."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.sink: FrameSink | None = None
        self._rid = 1000

    # The transport's Session contract.
    def frame_received(self, frame: Frame) -> None:
        self.frames.put_nowait(frame)

    def protocol_error(self, error: ProtocolError) -> None:
        self.closed.set()

    def connection_lost(self, reason: str) -> None:
        self.closed.set()

    def next_request_id(self) -> int:
        self._rid += 1
        return self._rid

    def frame(
        self,
        opcode: int,
        payload: Payload | bytes = b"",
        *,
        account: Account | None = None,
        sender: int | None = None,
        room: int = 0,
        epoch: int = 0,
        context: int = 0,
        signer: SigningKey | None = None,
        sign: bool = True,
        hlc: int = 0,
    ) -> Frame:
        """A frame with a fresh request id, signed by ``signer`` (default: the account's key)."""
        header = FrameHeader(
            opcode,
            request_id=self.next_request_id(),
            room_id=room,
            sender_id=sender if sender is not None else (account.member_id if account else 0),
            epoch=epoch,
            context_id=context,
            hlc_timestamp=hlc,
        )
        frame = Frame.build(header, payload)
        key = signer or (account.key if account is not None else None)
        if sign and key is not None:
            sign_header(frame.header, key)
        return frame

    def write(self, data: bytes) -> None:
        assert self.sink is not None
        self.sink.send(data)

    def send(self, opcode: int, payload: Payload | bytes = b"", **kw: Any) -> int:
        frame = self.frame(opcode, payload, **kw)
        self.write(frame.encode())
        return frame.header.request_id

    async def next(self) -> Frame:
        return await asyncio.wait_for(self.frames.get(), TIMEOUT)

    async def reply(self, request_id: int) -> Frame:
        """The answer to one request (other frames, e.g. broadcasts of others, are skipped)."""
        while True:
            frame = await self.next()
            if frame.header.request_id == request_id:
                return frame

    async def replies(self, request_ids: list[int]) -> dict[int, Frame]:
        """The answers to several requests, whatever order they come in."""
        wanted, out = set(request_ids), {}
        while wanted:
            frame = await self.next()
            if frame.header.request_id in wanted:
                wanted.discard(frame.header.request_id)
                out[frame.header.request_id] = frame
        return out

    async def error(self, request_id: int) -> ErrorPayload:
        frame = await self.reply(request_id)
        assert frame.header.opcode == Opcode.ERROR, frame.header
        return error_of(frame)

    def hello_frame(
        self, token: str, key: SigningKey, *, hlc: int | None = None, proof: bytes | None = None
    ) -> Frame:
        """A Hello as the client library sends it: stamped now and proved by ``key``, unless
        ``hlc`` or ``proof`` say otherwise."""
        stamp = now_hlc() if hlc is None else hlc
        hello = signed_hello(token.encode(), key, stamp)
        if proof is not None:
            hello = replace(hello, proof=proof)
        return self.frame(Opcode.HELLO, hello, hlc=stamp, sign=False)

    async def hello(self, who: Account) -> HelloReply:
        frame = self.hello_frame(who.token, who.key)
        self.write(frame.encode())
        rid = frame.header.request_id
        frame = await self.reply(rid)
        assert frame.header.opcode == Opcode.HELLO_REPLY, frame.header
        reply = decode_payload(Opcode.HELLO_REPLY, frame.payload)
        assert isinstance(reply, HelloReply)
        return reply

    async def wait_closed(self) -> None:
        await asyncio.wait_for(self.closed.wait(), TIMEOUT)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close("test done")

    async def stream(self, total: int, chunk: bytes) -> int:
        """Write ``chunk`` repeatedly, ``total`` bytes at most, as fast as the socket takes it
        (a payload being uploaded), until the server closes the connection; bytes written."""
        sent = 0
        while sent < total and not self.closed.is_set():
            assert self.sink is not None
            if self.sink.buffered > len(chunk):  # let the kernel take what is queued first
                await asyncio.sleep(0.001)
                continue
            part = chunk[: total - sent]
            if not self.sink.send(part):
                break
            sent += len(part)
        return sent


def header_bytes(opcode: int, payload_size: int, request_id: int = 7) -> bytes:
    """A header whose payload_size is whatever we say (past what FrameHeader would build)."""
    raw_header = bytearray(FrameHeader(opcode, request_id=request_id).to_bytes())
    struct.pack_into(">I", raw_header, 12, payload_size)
    return bytes(raw_header)


def now_hlc() -> int:
    return hlc.pack(int(time.time() * 1000), 0)


def error_of(frame: Frame) -> ErrorPayload:
    payload = decode_payload(Opcode.ERROR, frame.payload)
    assert isinstance(payload, ErrorPayload)
    return payload


async def raw(server: RunningServer | int, *, hello_as: Account | None = None) -> Raw:
    """A raw TCP connection to ``server`` (or to that port of this host); with ``hello_as``,
    already authenticated as that account."""
    conn = Raw()
    port = server if isinstance(server, int) else server.tcp_port
    assert port is not None
    conn.sink = await connect_tcp("127.0.0.1", port, lambda _sink: conn)
    if hello_as is not None:
        await conn.hello(hello_as)
    return conn


async def expect_error(conn: Raw, request_id: int, code: ErrorCode) -> ErrorPayload:
    error = await conn.error(request_id)
    assert error.code == code, (ErrorCode(error.code).name, error.message, code.name)
    return error


async def still_serving(server: RunningServer) -> None:
    """A brand-new connection is answered: Ping gets its Pong."""
    conn = await raw(server)
    try:
        rid = conn.send(Opcode.PING)
        assert (await conn.reply(rid)).header.opcode == Opcode.PONG
    finally:
        conn.close()


# --- what is stored ---------------------------------------------------------------------------


def db_path(server_db_url: str) -> Path:
    return Path(server_db_url.removeprefix("sqlite:///"))


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (read-only, through SQLite itself so the WAL is included)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            table: sorted(con.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)
            for table in tables
        }
    finally:
        con.close()


async def rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the server's database, on either engine."""
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:
            out: dict[str, list[tuple[Any, ...]]] = {}
            for table in schema.metadata.sorted_tables:
                result = await conn.execute(sa.select(table))
                out[table.name] = sorted((tuple(r) for r in result), key=repr)
            return out
    finally:
        await engine.dispose()


def peak_rss(pid: int) -> int:
    """The most memory (bytes) process ``pid`` has ever had resident (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc")


async def quiesce(server: RunningServer, room_id: bytes, *clients: Client) -> None:
    """Wait until the room is at rest: nothing queued at its sequencer, and every client has
    applied the whole log and has nothing of its own in flight (e.g. the commit of a server
    Remove proposal that a client makes on its own)."""

    def at_rest() -> bool:
        worker = server.hub.rooms.get(room_id)
        if worker is None or worker.queued:
            return False
        last = worker.sequencer.next_log_index - 1
        for c in clients:
            room = c.core.rooms.get(room_id)
            if c.core.outbox or (room is not None and room.active and room.last_seen != last):
                return False
        return True

    async def stored() -> bool:
        # Sequenced is not yet stored: a server Remove proposal is appended after the Kick's
        # answer went out.
        worker = server.hub.rooms[room_id]
        state = await server.store.load_room(room_id)
        return state is not None and state.room.next_log_index == worker.sequencer.next_log_index

    async with asyncio.timeout(TIMEOUT):
        while not at_rest() or not await stored():  # noqa: ASYNC110 - state of other tasks
            await asyncio.sleep(0.02)


def room_int(room_id: bytes) -> int:
    return int.from_bytes(room_id, "big")
