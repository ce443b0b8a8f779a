"""Run the alembic history in ``alembic/`` against a database, from sync or async code.

Services run :func:`upgrade` at start-up; the ``kalandra db`` command exposes upgrade, downgrade
and current to operators.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from .urls import VERSION_TABLE, sqlalchemy_url

T = TypeVar("T")

# The history lives at the top of the source tree (it belongs to the deployment, not to one
# package); an installed copy (the container image) points at it with KALANDRA_ALEMBIC_DIR.
ALEMBIC_DIR = Path(
    os.environ.get("KALANDRA_ALEMBIC_DIR") or Path(__file__).resolve().parents[2] / "alembic"
)


def _config(connection: Connection | None = None) -> Config:
    ini = ALEMBIC_DIR / "alembic.ini"
    if not ini.is_file():
        raise FileNotFoundError(f"migration history not found at {ALEMBIC_DIR}")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


async def _with_connection(url: str, fn: Callable[[Connection], T]) -> T:
    engine = create_async_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(fn)
            await conn.commit()
            return result
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> None:
    await _with_connection(url, lambda conn: command.upgrade(_config(conn), revision))


async def downgrade(url: str, revision: str) -> None:
    await _with_connection(url, lambda conn: command.downgrade(_config(conn), revision))


async def current(url: str) -> str | None:
    def read(conn: Connection) -> str | None:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()

    return await _with_connection(url, read)


def upgrade_sync(url: str, revision: str = "head") -> None:
    asyncio.run(upgrade(url, revision))
