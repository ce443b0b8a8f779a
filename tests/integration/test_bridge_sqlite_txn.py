"""The bridge's mautrix database and the Kalandra store share one SQLite file (the embedded
default). A mautrix transaction that reads, then writes, must not fail when the store wrote in
between: SQLite refuses such a write at once ("database is locked", no busy wait), because the
transaction's snapshot is stale. It happened in the crypto store (fetched device keys are read,
then stored, in one transaction) while portals wrote to the store."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from mautrix.util.async_db import Database, UpgradeTable

from bridge.db.sqlite_txn import install_immediate_transactions


async def _scenario(path: Path) -> None:
    db = Database.create(f"sqlite:{path}", upgrade_table=UpgradeTable(), db_args={})
    await db.start()
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
        other = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        other.execute("CREATE TABLE IF NOT EXISTS s (k INTEGER PRIMARY KEY)")

        def write_elsewhere() -> None:  # the store's writer: waits for the lock, then commits
            other.execute("INSERT INTO s (k) VALUES (NULL)")

        acquire: Any = db.acquire()  # (mautrix types it as the connection itself)
        async with acquire as conn, conn.transaction():
            await conn.fetch("SELECT * FROM t")  # the transaction's snapshot begins here
            task = asyncio.get_running_loop().run_in_executor(None, write_elsewhere)
            await asyncio.sleep(0.2)  # the other write is done now, or waits for our lock
            await conn.execute("INSERT INTO t (v) VALUES ('x')")
        await task
        assert await db.fetchval("SELECT COUNT(*) FROM t") == 1
        assert other.execute("SELECT COUNT(*) FROM s").fetchone()[0] == 1
        other.close()
    finally:
        await db.stop()


def test_a_read_then_write_transaction_survives_a_write_in_between(tmp_path: Path) -> None:
    install_immediate_transactions()
    asyncio.run(_scenario(tmp_path / "bridge.db"))
