"""Running a homeserver: storage, keys, certificates, the hub and its listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from nacl.signing import SigningKey

from ..storage.reachable import outage, wait_for_database
from ..storage.sql import SqlStore
from ..transport.interface import Listener
from . import tls
from .cluster import ClusterNode
from .config import ServerConfig
from .hub import Hub

log = logging.getLogger("kalandra.server")


def load_or_create_server_key(path: Path) -> SigningKey:
    """The server's Ed25519 key (32-byte seed file, mode 0600), created on first start."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path}: not a 32-byte Ed25519 seed")
        return SigningKey(seed)
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(key))
    return key


@dataclass(slots=True)
class RunningServer:
    hub: Hub
    store: SqlStore
    listeners: dict[str, Listener] = field(default_factory=dict)

    @property
    def tcp_port(self) -> int | None:
        listener = self.listeners.get("tcp")
        return None if listener is None else listener.port

    @property
    def quic_port(self) -> int | None:
        listener = self.listeners.get("quic")
        return None if listener is None else listener.port

    async def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        await self.hub.stop()
        for listener in self.listeners.values():
            await listener.wait_closed()
        await self.store.close()


# Descriptors beyond the connections: the database, listeners, log files, the loop's own.
_SPARE_FDS = 256


def raise_fd_limit(connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE so ``connections`` sockets fit (up to the hard limit; the
    default soft limit, often 1,024, would refuse connections long before max_connections).
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _SPARE_FDS
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit to %d: %s", wanted, exc)
    if soft < connections + _SPARE_FDS:
        log.warning(
            "open file limit %d is below max_connections %d (+%d spare): raise the hard limit",
            soft,
            connections,
            _SPARE_FDS,
        )
    return soft


async def start_server(config: ServerConfig) -> RunningServer:
    raise_fd_limit(config.limits.max_connections)
    store = await SqlStore.open(config.database)
    data = config.data_dir
    key = load_or_create_server_key(config.server_key or data / "server.key")
    cluster = None
    if config.cluster.enabled:
        from .pg_bus import PgBus

        node = config.cluster.node_name or f"{socket.gethostname()}-{os.getpid()}"
        cluster = ClusterNode(config.cluster, store, PgBus(config.database, node))
    hub = Hub(store, config, key, cluster=cluster)
    hub.start()
    running = RunningServer(hub, store)
    buffered = config.limits.send_buffer
    try:
        await hub.start_cluster()
        if config.tcp_port is not None:
            from ..transport.tcp import serve_tcp

            running.listeners["tcp"] = await serve_tcp(
                config.tcp_host, config.tcp_port, hub.session_factory, max_buffered=buffered
            )
        if config.quic_port is not None:
            from ..transport.quic import serve_quic

            cert, private = tls.load_or_create(
                config.certificate or data / "server.crt",
                config.private_key or data / "server.pem",
                ["localhost", config.quic_host],
            )
            running.listeners["quic"] = await serve_quic(
                config.quic_host,
                config.quic_port,
                hub.session_factory,
                certificate=cert,
                private_key=private,
                max_buffered=buffered,
                idle_timeout=config.limits.idle_timeout,
            )
    except BaseException:
        await running.close()
        raise
    log.info(
        "kalandra server up: tcp %s, quic %s%s",
        running.tcp_port or "off",
        running.quic_port or "off",
        "" if cluster is None else f", cluster node {cluster.node}",
    )
    return running


def _tune_gc() -> None:
    """Fewer, cheaper cyclic collections once the server is up: what start-up loaded (modules,
    configuration, the rooms opened) is frozen out of every collection, and the youngest
    generation is collected per 10,000 net allocations instead of 700. Under load every frame
    allocates a few tracked objects and a burst keeps thousands of frames waiting, so the
    default thresholds cost the event loop several microseconds per frame in collections that
    found nothing to free (the frames were all still in use). Not higher: a collection's pause
    grows with the threshold, and the paced latency's p99 is made of such pauses."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def serve_forever(config: ServerConfig, *, ready_file: Path | None = None) -> None:
    """Run until SIGINT/SIGTERM. ``ready_file`` gets "tcp_port quic_port" once listening.
    A database server not up yet is waited for (a stop meanwhile returns quietly); one that
    refuses raises :class:`DatabaseRefused`."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not stopped.done():
            stopped.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    while True:
        if not await wait_for_database(config.database, stopped):
            return
        try:
            running = await start_server(config)
            _tune_gc()
            break
        except Exception as exc:
            if not outage(exc):
                raise
            # gone again since the probe: wait again (not in a busy loop)
            log.warning("Database lost during start-up (%s)", type(exc).__name__)
            await asyncio.sleep(1.0)
    try:
        if ready_file is not None:
            ports = f"{running.tcp_port or 0} {running.quic_port or 0}\n"
            await asyncio.to_thread(ready_file.write_text, ports)
        await stopped
    finally:
        await running.close()
