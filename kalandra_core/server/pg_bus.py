"""The cluster's bus on PostgreSQL: LISTEN/NOTIFY, with a mail table for large bodies.

Each node listens on its own channel and on the broadcast channel. A sender's messages leave in
the order given, from one connection: consecutive messages to the same channel share one NOTIFY
payload (base64 items), and a body too large for NOTIFY's 8,000 bytes goes into
``cluster_mail`` in the same transaction, its payload item naming only the row. PostgreSQL
hands a listener the notifications of committed transactions in commit order, so a receiver
that handles the items of each payload in order (fetching the named rows first) sees every
sender's messages in the order they were sent.

Targeted rows are deleted by their receiver; broadcast rows (``target_node`` ``*``) by any node
once they are a minute old (a node that has not read one by then has lost it, as it would
have lost a NOTIFY while disconnected).

A lost connection (the database restarting, a backend terminated) is noticed within a second
and all three are opened again. What was sent or notified meanwhile is lost: forwarded frames
then time out and are routed again, and the node is told (``on_gap``, once listening again) that
it may have missed fan-out; so is it when a notification's mail could not be read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import logging
import time
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]

from .bus import GapHandler, Handler

log = logging.getLogger("kalandra.server.cluster")

_PAYLOAD_MAX: Final = 7900  # NOTIFY takes < 8,000 bytes
_INLINE_MAX: Final = 3 * 2000  # bodies above this (4/3 of it in base64) go through the table
_BROADCAST: Final = "kalandra_bus_all"
_SWEEP_EVERY, _KEEP_BROADCAST = 30.0, 60.0  # seconds
_WATCH = 1.0  # seconds between looks at the connections
_LOST = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _channel(node: str) -> str:
    return "kalandra_bus_" + hashlib.sha256(node.encode()).hexdigest()[:24]


def asyncpg_dsn(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return "postgresql://" + rest if sep and scheme.startswith("postgres") else url


class PgBus:
    def __init__(self, url: str, node: str) -> None:
        self.node = node
        self._dsn = asyncpg_dsn(url)
        self._me = hashlib.sha256(node.encode()).hexdigest()[:16]
        self._channel = _channel(node)
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._incoming: asyncio.Queue[str] = asyncio.Queue()
        self._seq = itertools.count()
        self._conns: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._handler: Handler | None = None
        self._on_gap: GapHandler | None = None
        self._missed = False  # a notification's mail went unread: told at the next look
        self._fetch_lock = asyncio.Lock()

    async def start(self, handler: Handler, on_gap: GapHandler | None = None) -> None:
        self._handler = handler
        self._on_gap = on_gap
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="bus-send"),
            asyncio.create_task(self._receive_loop(), name="bus-receive"),
            asyncio.create_task(self._sweep_loop(), name="bus-sweep"),
            asyncio.create_task(self._watch_loop(), name="bus-watch"),
        ]

    async def _connect(self) -> None:
        settings = {"application_name": f"kalandra-bus {self.node}"[:63]}
        conns: list[Any] = []
        try:
            for _ in range(3):
                conns.append(await asyncpg.connect(self._dsn, server_settings=settings))
            await conns[0].add_listener(self._channel, self._notified)
            await conns[0].add_listener(_BROADCAST, self._notified)
        except BaseException:
            for conn in conns:
                conn.terminate()
            raise
        self._conns = conns

    @property
    def _send_conn(self) -> Any:
        return self._conns[1]

    @property
    def _fetch_conn(self) -> Any:
        return self._conns[2]

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(_WATCH)
            if not any(conn.is_closed() for conn in self._conns):
                if self._missed:
                    self._gap()
                continue
            log.warning("cluster bus: connection to the database lost; reconnecting")
            for conn in self._conns:
                conn.terminate()
            while True:
                try:
                    await self._connect()
                    break
                except _LOST as exc:
                    log.warning("cluster bus: reconnect failed (%s)", type(exc).__name__)
                    await asyncio.sleep(_WATCH)
            log.info("cluster bus: reconnected")
            # Listening again; what was notified meanwhile is gone, and nothing says what it was.
            self._gap()

    def _gap(self) -> None:
        self._missed = False
        if self._on_gap is not None:
            try:
                self._on_gap()
            except Exception:
                log.exception("cluster bus: the gap handler failed")

    def send(self, target: str, body: bytes) -> None:
        self._outbox.put_nowait((_channel(target), body))

    def broadcast(self, body: bytes) -> None:
        self._outbox.put_nowait((_BROADCAST, body))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in self._conns:
            with contextlib.suppress(*_LOST):
                await conn.close()

    # --- sending ------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 512:
                batch.append(self._outbox.get_nowait())
            try:
                await self._send_batch(self._send_conn, batch)
            except _LOST as exc:
                # Lost: the senders waiting on these time out and retry (forwarded frames), or
                # their clients sync (fan-out).
                log.warning(
                    "cluster bus: %d message(s) not sent (%s)", len(batch), type(exc).__name__
                )

    async def _send_batch(self, conn: Any, batch: list[tuple[str, bytes]]) -> None:
        async with conn.transaction():
            channel: str | None = None
            items: list[str] = []
            size = 0
            for target, body in batch:
                if len(body) > _INLINE_MAX:
                    row = "*" if target == _BROADCAST else target
                    mail_id = await conn.fetchval(
                        "INSERT INTO cluster_mail (target_node, body) VALUES ($1, $2) "
                        "RETURNING mail_id",
                        row,
                        body,
                    )
                    item = f"m{mail_id}"
                else:
                    item = "i" + base64.b64encode(body).decode("ascii")
                if channel is not None and (target != channel or size + len(item) > _PAYLOAD_MAX):
                    await self._notify(conn, channel, items)
                    items, size = [], 0
                channel = target
                items.append(item)
                size += len(item) + 1
            if channel is not None:
                await self._notify(conn, channel, items)

    async def _notify(self, conn: Any, channel: str, items: list[str]) -> None:
        # The sequence number keeps PostgreSQL from folding two equal payloads into one.
        payload = f"{self._me}:{next(self._seq)}:" + ",".join(items)
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    # --- receiving ----------------------------------------------------------------------------

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._incoming.put_nowait(payload)

    async def _receive_loop(self) -> None:
        while True:
            payload = await self._incoming.get()
            sender, _, rest = payload.partition(":")
            if sender == self._me:
                continue  # our own broadcast
            items = rest.partition(":")[2].split(",")
            try:
                async with self._fetch_lock:
                    bodies = await self._bodies(self._fetch_conn, items)
            except _LOST as exc:
                log.warning("cluster bus: mail not read (%s)", type(exc).__name__)
                self._missed = True
                continue
            assert self._handler is not None
            for body in bodies:
                try:
                    self._handler(body)
                except Exception:
                    log.exception("cluster bus: a message failed")

    async def _bodies(self, conn: Any, items: list[str]) -> list[bytes]:
        wanted = [int(item[1:]) for item in items if item.startswith("m")]
        mail: dict[int, bytes] = {}
        if wanted:
            rows = await conn.fetch(
                "SELECT mail_id, body FROM cluster_mail WHERE mail_id = ANY($1::bigint[])",
                wanted,
            )
            mail = {row["mail_id"]: bytes(row["body"]) for row in rows}
            await conn.execute(
                "DELETE FROM cluster_mail "
                "WHERE mail_id = ANY($1::bigint[]) AND target_node <> '*'",
                wanted,
            )
        out: list[bytes] = []
        for item in items:
            if item.startswith("i"):
                out.append(base64.b64decode(item[1:]))
            elif item.startswith("m") and int(item[1:]) in mail:
                out.append(mail[int(item[1:])])
        return out

    async def _sweep_loop(self) -> None:
        seen: list[tuple[float, int]] = []
        while True:
            await asyncio.sleep(_SWEEP_EVERY)
            try:
                newest = await self._locked("SELECT max(mail_id) FROM cluster_mail")
                now = time.monotonic()
                seen.append((now, int(newest or 0)))
                old = [mail_id for at, mail_id in seen if now - at >= _KEEP_BROADCAST]
                if old:
                    seen = [(at, m) for at, m in seen if now - at < _KEEP_BROADCAST]
                    await self._locked(
                        "DELETE FROM cluster_mail WHERE target_node = '*' AND mail_id <= $1",
                        max(old),
                    )
            except _LOST as exc:
                log.warning("cluster bus: sweep failed (%s)", type(exc).__name__)

    async def _locked(self, query: str, *args: Any) -> Any:
        # The receive loop uses this connection too; asyncpg takes one query at a time.
        async with self._fetch_lock:
            return await self._fetch_conn.fetchval(query, *args)
