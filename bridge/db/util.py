"""Conversions shared by the tables: u64 member ids in signed BIGINT columns, times."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast

from mautrix.util.async_db import Connection as LoggingConnection
from mautrix.util.async_db import Database


def u64_to_db(value: int) -> int:
    """Member ids are u64; BIGINT is signed (two's complement, as the homeserver's tables)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def u64_from_db(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[LoggingConnection]:
    """One connection of the pool in one transaction (mautrix's own annotations of acquire and
    transaction do not describe context managers)."""
    acquire = cast("AbstractAsyncContextManager[LoggingConnection]", db.acquire())
    async with acquire as conn:
        begin = cast("AbstractAsyncContextManager[None]", conn.transaction())
        async with begin:
            yield conn
