"""What the tables share: u64 member ids in signed BIGINT columns (the homeserver's own
conversion, its tables and ours hold the same ids), times, transactions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast

from mautrix.util.async_db import Connection as LoggingConnection
from mautrix.util.async_db import Database

from kalandra_core.storage.schema import u64_from_db, u64_to_db

__all__ = ["now_ms", "transaction", "u64_from_db", "u64_to_db"]


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
