"""One alembic history upgrades a fresh SQLite file and a fresh PostgreSQL database to head and
back to an empty schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from kalandra_core.storage import migrations
from kalandra_core.storage.urls import VERSION_TABLE, DatabaseUrlError, sqlalchemy_url


async def _tables_sqlite(url: str) -> set[str]:
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    # sqlite_* tables are SQLite's own bookkeeping (AUTOINCREMENT's sqlite_sequence cannot be
    # dropped); they are not part of our schema.
    return {r[0] for r in rows if not r[0].startswith("sqlite_")}


async def _tables_pg(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def _check_round_trip(url: str, tables) -> None:  # type: ignore[no-untyped-def]
    assert await migrations.current(url) is None
    await migrations.upgrade(url)
    assert await migrations.current(url) == migrations.head_revision()
    assert {"schema_info", VERSION_TABLE} <= await tables(url)
    # Idempotent: a second upgrade at head is a no-op.
    await migrations.upgrade(url)
    await migrations.downgrade(url, "base")
    assert await migrations.current(url) is None
    assert await tables(url) <= {VERSION_TABLE}


async def test_sqlite_upgrade_to_head_and_back(sqlite_url: str, tmp_path: Path) -> None:
    await _check_round_trip(sqlite_url, _tables_sqlite)
    assert (tmp_path / "kalandra.db").is_file()


@pytest.mark.postgres
async def test_postgres_upgrade_to_head_and_back(postgres_url: str) -> None:
    await _check_round_trip(postgres_url, _tables_pg)


@pytest.mark.postgres
async def test_schema_info_row_is_written(postgres_url: str) -> None:
    await migrations.upgrade(postgres_url)
    conn = await asyncpg.connect(postgres_url)
    try:
        value = await conn.fetchval("SELECT value FROM schema_info WHERE key = 'created_by'")
    finally:
        await conn.close()
    assert value == "kalandra-bridge"


def test_url_forms() -> None:
    assert sqlalchemy_url("sqlite:///a.db") == "sqlite+aiosqlite:///a.db"
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    with pytest.raises(DatabaseUrlError):
        sqlalchemy_url("mysql://x")
