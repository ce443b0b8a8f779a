"""Connections cut in the middle of frames, over real TCP: a proxy between the clients and the
homeserver forwards bytes and drops each connection after a random number of them (so cuts land
inside headers and payloads, in both directions). The clients reconnect and resend on their own:
every message is delivered exactly once, in order, and the sender's calls all succeed."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import ServerConfig

COUNT = 200


class CuttingProxy:
    """Forwards TCP to ``target``; each connection dies after a random byte budget."""

    def __init__(self, target: int, seed: int, budget: tuple[int, int]) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.budget = budget
        self.cuts = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        # Mostly short-lived connections; every eighth a long one, so a frame larger than the
        # short budgets (a catch-up SyncResponse) can get through at all.
        self.connections += 1
        long_lived = self.connections % 8 == 0
        left = [self.rng.randint(*self.budget) * (50 if long_lived else 1)]
        done = asyncio.Event()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while not done.is_set():
                    data = await src.read(4096)
                    if not data:
                        break
                    if len(data) >= left[0]:
                        dst.write(data[: left[0]])  # the cut lands inside a frame
                        with contextlib.suppress(ConnectionError, OSError):
                            await dst.drain()
                        self.cuts += 1
                        break
                    left[0] -= len(data)
                    dst.write(data)
                    await dst.drain()
            done.set()

        tasks = [
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ]
        await done.wait()
        for w in (writer, up_writer):
            w.transport.abort()
        for t in tasks:
            t.cancel()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = ServerConfig(
        database=f"sqlite:///{tmp_path / 'k.db'}", tcp_port=0, quic_port=None, data_dir=tmp_path
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.close()


async def _client(server: RunningServer, name: str, port: int) -> Client:
    account = await server.store.create_member(name)
    token = await server.store.issue_token(account.member_id)
    client = Client(
        ClientCore(account.member_id, bytes(SigningKey.generate())),
        ServerAddress("tcp", "127.0.0.1", port),
        token,
        keepalive=1.0,
        request_timeout=60.0,
    )
    async with asyncio.timeout(60):
        while True:  # the first connection may be cut during the handshake too
            try:
                await client.connect()
                return client
            except (ConnectionError, OSError, TimeoutError, Exception):
                await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_clients_recover_from_connections_cut_mid_frame(server: RunningServer) -> None:
    assert server.tcp_port is not None
    steady = CuttingProxy(server.tcp_port, seed=1, budget=(10**9, 10**9))
    cutting = CuttingProxy(server.tcp_port, seed=7, budget=(300, 6000))
    for proxy in (steady, cutting):
        await proxy.start()
    alice = await _client(server, "alice", steady.port)
    bob = await _client(server, "bob", steady.port)
    await bob.publish_key_packages(1)
    room = await alice.create_room("lossy")
    await alice.invite(room, [bob.core.member_id])
    await asyncio.wait_for(bob.joined.get(), 15)
    await alice.close()
    await bob.close()

    # The same identities, now through the cutting proxy (their state carries over).
    alice = Client(
        alice.core,
        ServerAddress("tcp", "127.0.0.1", cutting.port),
        alice._token,
        keepalive=1.0,
        request_timeout=60.0,
    )
    bob = Client(
        bob.core,
        ServerAddress("tcp", "127.0.0.1", cutting.port),
        bob._token,
        keepalive=1.0,
        request_timeout=60.0,
    )
    try:
        for c in (alice, bob):
            async with asyncio.timeout(60):
                while True:
                    try:
                        await c.connect()
                        break
                    except Exception:
                        await asyncio.sleep(0.05)

        async def send_all() -> list[int]:
            return [await alice.send_text(room, f"m{i}") for i in range(COUNT)]

        received: list[str] = []

        async def receive_all() -> None:
            while len(received) < COUNT:
                message = await bob.messages.get()
                if message.room_id == room:
                    received.append(message.content.body)

        async with asyncio.timeout(180):
            indexes, _ = await asyncio.gather(send_all(), receive_all())
        assert received == [f"m{i}" for i in range(COUNT)]
        assert len(set(indexes)) == COUNT
        assert indexes == sorted(indexes)
        assert cutting.cuts >= 10, cutting.cuts  # really cut, many times
        stored = await server.store.load_frames(room, 0, 10_000)
        bodies_logged = [f for f in stored if f.log_index in set(indexes)]
        assert len(bodies_logged) == COUNT  # each message stored once
    finally:
        await alice.close()
        await bob.close()
        for proxy in (steady, cutting):
            await proxy.close()
