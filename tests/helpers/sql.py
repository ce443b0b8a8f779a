"""A database looked at behind its owner's back (the bridge's, the server's), on a connection
of the test's own, on either engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from kalandra_core.storage.urls import sqlalchemy_url


@asynccontextmanager
async def connection(url: str) -> AsyncIterator[AsyncConnection]:
    """A connection to the database of ``url`` (the store's URL), in a transaction committed
    at the end."""
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        await engine.dispose()


async def query(url: str, sql: str, **params: Any) -> list[Any]:
    """The rows of a SQL statement with named ``:params``."""
    async with connection(url) as conn:
        return list((await conn.execute(sa.text(sql), params)).all())
