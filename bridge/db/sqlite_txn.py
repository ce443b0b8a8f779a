"""mautrix's SQLite transactions, begun IMMEDIATE.

mautrix begins its transactions DEFERRED: the first read takes a snapshot and the first write
then upgrades it to the write lock. The bridge's database is also the embedded Kalandra store's,
whose writer commits all the time; if it commits between that first read and that first write,
SQLite cannot upgrade the stale snapshot and fails the write at once ("database is locked"),
without waiting the busy timeout. The crypto store does exactly this (stored device keys read,
then the fetched ones written), and lost device signatures. Beginning IMMEDIATE takes the write
lock up front, waiting for it as long as the busy timeout allows; mautrix's transactions are
short, and its pool is one connection, so they were serialized anyway.
"""

from __future__ import annotations

from typing import Any

from mautrix.util.async_db import aiosqlite as mautrix_sqlite


class ImmediateTxnConnection(mautrix_sqlite.TxnConnection):
    # mautrix's own signature (whose transaction() calls self.execute).
    async def execute(  # type: ignore[override]
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        if query == "BEGIN TRANSACTION":  # what mautrix's transaction() sends
            query = "BEGIN IMMEDIATE TRANSACTION"
        return await super().execute(query, *args, timeout=timeout)


def install_immediate_transactions() -> None:
    """Makes mautrix open its SQLite connections as ``ImmediateTxnConnection`` (before the
    database starts)."""
    mautrix_sqlite.TxnConnection = ImmediateTxnConnection  # type: ignore[misc]
