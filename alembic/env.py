"""Alembic environment: one migration history for SQLite (aiosqlite) and PostgreSQL (asyncpg).

The database comes from, in order: a connection handed over by
``kalandra_core.storage.migrations`` (``config.attributes["connection"]``), ``-x database=URL``,
or the ``KALANDRA_DATABASE`` environment variable. URLs may be written the short way
(``sqlite:///path``, ``postgresql://...``); the async driver is added here.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from kalandra_core.storage.urls import VERSION_TABLE, sqlalchemy_url

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("database")
    url = url or os.environ.get("KALANDRA_DATABASE")
    if not url:
        raise SystemExit("no database: pass -x database=URL or set KALANDRA_DATABASE")
    return sqlalchemy_url(url)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables when needed.
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=_database_url(), version_table=VERSION_TABLE, literal_binds=True, target_metadata=None
    )
    with context.begin_transaction():
        context.run_migrations()
elif (handed := config.attributes.get("connection")) is not None:
    _run(handed)
else:
    asyncio.run(_run_async(_database_url()))
