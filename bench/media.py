"""Media through the homeserver: upload and download throughput of one file (16 MiB quick,
64 MiB full).

The server runs in its own process (``python -m kalandra_core serve``, fresh SQLite database,
WAL, ``synchronous=FULL``, TCP on 127.0.0.1). Setup (not measured): A creates a room and adds
B through the native client driver. Measured: A's ``upload_media`` of the file's random bytes
(encryption, BLAKE3, one CASPut per 256 KiB block with a window of blocks in flight, the
server storing the blocks that arrive together in one transaction) and B's ``download_media``
of it (one CASGet per block, every block checked and decrypted); best of 1 run (quick) or 3
(full).

The limit, measured in the same run, is the lower of two ceilings: raw loopback TCP throughput
(asyncio streams, 64 MiB in 256 KiB writes to a reader that discards them) and the
XChaCha20-Poly1305 rate of 256 KiB blocks on one core (the blob's own cipher,
``media/xchacha.py``); the table names which one.
The upload is also held against the rate at which this disk takes the same bytes durably: the
file's blocks inserted into an SQLite table with the server's pragmas (WAL, ``synchronous=FULL``),
in transactions of ``IN_FLIGHT`` blocks (the blocks a client has in flight), a fresh file in
the same temporary directory. On the development machine that, not TCP, is the upload's ceiling.
Below it lies the disk itself: the same bytes appended to a plain file, ``fdatasync`` after each
``IN_FLIGHT`` blocks. No durable store can take an upload faster than that, so it is printed
too: when it is under half of loopback TCP, the upload target is beyond this machine's disk.

Where the time goes, with no target: the CPU (user + system, all threads) the server process
and this process (the clients) spent per 256 KiB block, over every run, held against the time
per block the target leaves (256 KiB at half the limit). Above 1, that process alone cannot
move blocks at the target's rate, whatever the other one does; the two share this machine's
cores besides.

One more figure, with no target: B downloads the file again and again in the same session until
256 MiB went by, past the session's burst of media blocks (``server.limits.media_rate_burst``,
512 blocks) into its sustained block rate (``media_rate_per_second``, 2,048 a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.media import IN_FLIGHT
from kalandra_core.media import BLOCK_SIZE
from kalandra_core.media.blob import MediaRef
from kalandra_core.media.xchacha import XChaCha20Poly1305
from kalandra_core.storage.sqlite_writer import WRITER_PRAGMAS

from ._server_proc import ServerProcess
from .common import Figure, Results, cpu_seconds, rate

MIB = 1024 * 1024
_LOOPBACK_BYTES = 64 * MIB
_SUSTAINED = 256 * MIB  # downloaded back to back in one session (_sustained_download)


async def _loopback_mib_s() -> float:
    received = 0
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while received < _LOOPBACK_BYTES:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        if not done.done():
            done.set_result(time.perf_counter())
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        block = os.urandom(BLOCK_SIZE)
        start = time.perf_counter()
        for _ in range(_LOOPBACK_BYTES // BLOCK_SIZE):
            writer.write(block)
            await writer.drain()
        end = await asyncio.wait_for(done, 60)
        writer.close()
    finally:
        server.close()
    return _LOOPBACK_BYTES / MIB / (end - start)


def _aead_mib_s(quick: bool) -> float:
    block, aead, nonce = os.urandom(BLOCK_SIZE), XChaCha20Poly1305(os.urandom(32)), os.urandom(24)

    def one() -> bytes:
        return aead.encrypt(nonce, block, b"")

    return rate(one, 16, 3 if quick else 10) * BLOCK_SIZE / MIB


def _durable_mib_s(data: bytes) -> float:
    """SQLite inserts of ``data``'s blocks, IN_FLIGHT per durable transaction (see above)."""
    with tempfile.TemporaryDirectory(prefix="kalandra-bench-disk-") as tmp:
        conn = sqlite3.connect(Path(tmp) / "disk.db", isolation_level=None)
        try:
            for pragma in WRITER_PRAGMAS:
                conn.execute(pragma)
            conn.execute("CREATE TABLE blocks (digest BLOB PRIMARY KEY, data BLOB NOT NULL)")
            view = memoryview(data)
            rows = [
                (os.urandom(32), view[i : i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)
            ]
            start = time.perf_counter()
            for i in range(0, len(rows), IN_FLIGHT):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO blocks VALUES (?, ?)", rows[i : i + IN_FLIGHT])
                conn.execute("COMMIT")
            return len(data) / MIB / (time.perf_counter() - start)
        finally:
            conn.close()


def _raw_disk_mib_s(data: bytes) -> float:
    """``data`` appended to a plain file, ``fdatasync`` after every IN_FLIGHT blocks: what this
    disk takes durably when nothing is written twice (see the module doc)."""
    step = IN_FLIGHT * BLOCK_SIZE
    with tempfile.TemporaryDirectory(prefix="kalandra-bench-disk-") as tmp:
        fd = os.open(Path(tmp) / "raw.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            start = time.perf_counter()
            for i in range(0, len(data), step):
                os.write(fd, view[i : i + step])
                os.fdatasync(fd)
            return len(data) / MIB / (time.perf_counter() - start)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _cpu_of(server_pid: int, into: list[float]) -> Iterator[None]:
    """Add the CPU seconds the server process and this process spend in the block to
    ``into`` ([server, this process])."""
    server, here = cpu_seconds(server_pid), time.process_time()
    yield
    into[0] += cpu_seconds(server_pid) - server
    into[1] += time.process_time() - here


async def _sustained_download(b: Client, room: bytes, ref: MediaRef, data: bytes) -> float:
    """``ref`` downloaded until ``_SUSTAINED`` bytes went by, in one session: past the
    session's burst of media blocks into its sustained block rate."""
    count = max(1, _SUSTAINED // len(data))
    start = time.perf_counter()
    for _ in range(count):
        if await b.download_media(room, ref) != data:
            raise AssertionError("the downloaded file differs")
    return count * len(data) / MIB / (time.perf_counter() - start)


async def _clients(server: ServerProcess) -> tuple[Client, Client, bytes]:
    address = ServerAddress("tcp", "127.0.0.1", server.port)
    a_acc, b_acc = server.users["alice"], server.users["bob"]
    a = Client(ClientCore(a_acc.member_id, os.urandom(32)), address, a_acc.token)
    b = Client(ClientCore(b_acc.member_id, os.urandom(32)), address, b_acc.token)
    await a.connect()
    await b.connect()
    await b.publish_key_packages(1)
    room = await a.create_room(name="media bench")
    await a.invite(room, [b_acc.member_id])
    joined = await asyncio.wait_for(b.joined.get(), 30)
    if joined != room:
        raise AssertionError("B joined another room")
    await b.settle()
    return a, b, room


async def _main(quick: bool) -> Results:
    runs = 1 if quick else 3
    size = (16 if quick else 64) * MIB
    loopback = await _loopback_mib_s()
    aead = _aead_mib_s(quick)
    print(f"media: loopback TCP {loopback:,.0f} MiB/s, XChaCha20-Poly1305 {aead:,.0f} MiB/s")
    limit_name, limit = (
        ("loopback TCP", loopback) if loopback <= aead else ("XChaCha20-Poly1305", aead)
    )
    async with ServerProcess(["alice", "bob"]) as server:
        t0 = time.perf_counter()
        a, b, room = await _clients(server)
        print(f"media: server pid {server.pid}; setup {time.perf_counter() - t0:.1f} s")
        up = down = disk = raw = 0.0
        cpu = {"upload": [0.0, 0.0], "download": [0.0, 0.0]}  # [server, clients] seconds
        try:
            for _ in range(runs):
                data = os.urandom(size)
                disk = max(disk, _durable_mib_s(data))
                raw = max(raw, _raw_disk_mib_s(data))
                with _cpu_of(server.pid, cpu["upload"]):
                    start = time.perf_counter()
                    ref = await a.upload_media(room, data, name="bench.bin")
                    up = max(up, size / MIB / (time.perf_counter() - start))
                with _cpu_of(server.pid, cpu["download"]):
                    start = time.perf_counter()
                    got = await b.download_media(room, ref)
                    down = max(down, size / MIB / (time.perf_counter() - start))
                if got != data:
                    raise AssertionError("the downloaded file differs")
            # Past one session's burst of frames: the same file again and again, back to back.
            sustained = await _sustained_download(b, room, ref, data)
        finally:
            await a.close()
            await b.close()
    print(
        f"media: this disk takes {raw:,.0f} MiB/s durably in a plain file, SQLite {disk:,.0f};"
        f" {raw / loopback:.2f} of loopback TCP"
    )
    target = (">= 0.50 x limit", limit_name, limit)
    name = f"{size // MIB} MiB"
    blocks = runs * -(-size // BLOCK_SIZE)
    budget_us = BLOCK_SIZE / MIB / (0.5 * limit) * 1e6  # the target's time per block
    cpu_figures = [
        Figure(
            f"media {way}, {who} CPU per 256 KiB block",
            seconds / blocks * 1e6,
            "us",
            "-",
            "time per block at the target",
            budget_us,
            0,
        )
        for way in ("upload", "download")
        for who, seconds in zip(("server", "client"), cpu[way], strict=True)
    ]
    return Results(
        [
            Figure(f"media upload {name} (TCP)", up, "MiB/s", *target, 1),
            Figure(f"media download {name} (TCP)", down, "MiB/s", *target, 1),
            Figure(
                f"media upload {name}, against the disk",
                up,
                "MiB/s",
                "-",
                "SQLite durable",
                disk,
                1,
            ),
            Figure(
                f"media upload {name}, against the raw disk",
                up,
                "MiB/s",
                "-",
                "fdatasync'd file",
                raw,
                1,
            ),
            *cpu_figures,
            Figure(
                f"media download, {_SUSTAINED // MIB} MiB back to back, 1 session",
                sustained,
                "MiB/s",
                "-",
                "loopback TCP",
                loopback,
                1,
            ),
        ]
    )


def run(quick: bool) -> Results:
    return asyncio.run(_main(quick))
