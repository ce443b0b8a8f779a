"""Waiting for the database: at start-up, and for an operation that met an outage.

A service started before its PostgreSQL server (a reboot, a container started first, a database
restart) waits for it: one log line per attempt, retried with a capped backoff. A server that
answers but refuses (wrong password, no such database or role) is a configuration error and
fails at once: retrying would never fix it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from ..backoff import Backoff
from .urls import DatabaseRefused, engine_name, sqlalchemy_url

__all__ = [
    "DatabaseRefused",
    "masked",
    "outage",
    "through_outage",
    "unreachable",
    "wait_for_database",
]

T = TypeVar("T")

log = logging.getLogger("kalandra.storage")

FIRST_DELAY = 1.0  # seconds before the second attempt, doubled after each failure
MAX_DELAY = 30.0  # the cap of that backoff
CONNECT_TIMEOUT = 10.0  # one attempt (a server that accepts TCP but never answers)


def masked(url: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL we can parse: say nothing of it rather than leak it
        return "(the configured database)"


# What a connection attempt meets while the server is down, restarting or out of reach. Not
# every OSError: a port of ours already in use is not the database's outage.
_OUTAGE_ERRNOS = frozenset(
    (
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOENT,  # a Unix socket not created yet
    )
)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the server is not there (yet), as opposed to a refusal."""
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    if isinstance(exc, OSError) and type(exc) is OSError:
        if exc.errno in _OUTAGE_ERRNOS:
            return True
        # asyncio's create_connection, every address of a host failed
        return exc.errno is None and str(exc).startswith("Multiple exceptions")
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True  # a pooled connection the server closed while it was down
    return isinstance(
        exc,
        asyncpg.CannotConnectNowError  # starting up or shutting down
        | asyncpg.TooManyConnectionsError
        | asyncpg.ConnectionDoesNotExistError  # cut while talking
        | asyncpg.InternalClientError,  # asyncpg's own, when a connection is lost mid-way
    )


def outage(exc: BaseException) -> bool:
    """Whether ``exc``, or what it wraps (SQLAlchemy's DBAPIError, asyncpg's adapters), means
    the server went away: an outage to wait out, not an error of ours."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if unreachable(current):
            return True
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _probe(url: str) -> None:
    dsn = make_url(sqlalchemy_url(url)).set(drivername="postgresql")
    conn = await asyncpg.connect(
        dsn.render_as_string(hide_password=False), timeout=CONNECT_TIMEOUT
    )
    await conn.close()


async def wait_for_database(url: str, stopping: asyncio.Future[Any] | None = None) -> bool:
    """Return True once the database at ``url`` accepts a connection, False if ``stopping``
    completes first. Raises :class:`DatabaseRefused` when the server refuses us. SQLite has
    no server to wait for."""
    if engine_name(url) != "postgresql":
        return True
    backoff, attempt = Backoff(FIRST_DELAY, MAX_DELAY), 1
    while True:
        probe = asyncio.ensure_future(_probe(url))
        if stopping is not None:
            await asyncio.wait({probe, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not probe.done():
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
                return False
        try:
            await probe
        except Exception as exc:
            if not unreachable(exc):
                raise DatabaseRefused(f"{masked(url)} refused: {_describe(exc)}") from None
            delay = backoff.next()
            log.warning(
                "Database %s unreachable (%s), attempt %d: waiting for the database,"
                " next attempt in %.0f s",
                masked(url),
                _describe(exc),
                attempt,
                delay,
            )
        else:
            if attempt > 1:
                log.info("Database %s reachable after %d attempts", masked(url), attempt)
            return True
        if stopping is None:
            await asyncio.sleep(delay)
        else:
            done, _ = await asyncio.wait({stopping}, timeout=delay)
            if done:
                return False
        attempt += 1


async def through_outage(
    operation: Callable[[], Awaitable[T]], what: str, logger: logging.Logger = log
) -> T:
    """``operation()``, done again after a pause (capped backoff) each time it fails for an
    outage of the database, however long; any other failure is raised. One warning when the
    wait starts, one line when it is over."""
    backoff, waiting = Backoff(0.5, MAX_DELAY / 2), False
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not outage(exc):
                raise
            if not waiting:
                logger.warning("%s waits for the database (%s)", what, type(exc).__name__)
                waiting = True
            await backoff.pause()
            continue
        if waiting:
            logger.info("%s done: the database is back", what)
        return result
