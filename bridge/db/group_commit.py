"""The bridge's per-event writes, committed together (group commit).

Every portal records each event it bridges (the message map, the dedupe mark, the prepared
frame) in a transaction of its own, and on SQLite all of them went through mautrix's one
connection: a portal waited for every other portal's BEGIN, statements and COMMIT (each a hop to
the connection's thread), and that connection met the Kalandra store's writer on the file lock,
whose busy handler sleeps in steps instead of waiting for the holder.

On SQLite the writes go to the Kalandra store's writer thread instead (same file:
``SqlStore.sqlite_writer``): what is waiting when it is free is committed in one transaction,
in one hop, in the same order as the homeserver's own writes. Each write keeps its own
all-or-nothing (a savepoint: one that fails is rolled back alone and raised to its caller),
and no caller goes on before the COMMIT that holds its write returned, so what a caller had
durable before it has now. A caller awaits its write before its next step, so each portal's
writes stay in its order. On PostgreSQL (or before the store is open) a write is a transaction
on mautrix's pool, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sqlite3
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database

from kalandra_core.storage.sqlite_writer import SqliteWriter

from .util import transaction

Statement = tuple[str, tuple[Any, ...]]

_PARAM = re.compile(r"\$(\d+)")  # mautrix's $1 placeholders, as sqlite3 numbers them
_GROUPS: weakref.WeakKeyDictionary[Database, GroupCommit] = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class _Write:
    statements: Sequence[Statement]
    future: asyncio.Future[None]


class GroupCommit:
    """Writes for one SQLite file, through its Kalandra store's writer."""

    def __init__(self, writer: SqliteWriter) -> None:
        self._writer = writer
        self._waiting: list[_Write] = []
        self._flushing: asyncio.Task[None] | None = None
        self.groups = 0  # transactions committed (tests, metrics)

    async def write(self, statements: Sequence[Statement]) -> None:
        """Run ``statements`` in one transaction, shared with the writes waiting meanwhile;
        returns once it is committed. Cancelled before its group runs, it is left out;
        afterwards it may still commit (as any cancelled COMMIT may)."""
        item = _Write(statements, asyncio.get_running_loop().create_future())
        self._waiting.append(item)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="bridge-group-commit")
        await item.future

    async def _flush(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            group = [item for item in group if not item.future.done()]
            if not group:
                continue
            bodies = [item.statements for item in group]
            try:
                outcomes = await self._writer.transaction(
                    functools.partial(_run_group, bodies=bodies)
                )
            except Exception as exc:  # the COMMIT (or the writer itself) failed: all fail
                outcomes = [exc] * len(group)
            self.groups += 1
            for item, outcome in zip(group, outcomes, strict=True):
                if item.future.done():
                    continue
                if outcome is None:
                    item.future.set_result(None)
                else:
                    item.future.set_exception(outcome)


def _run_group(
    conn: sqlite3.Connection, *, bodies: list[Sequence[Statement]]
) -> list[BaseException | None]:
    """On the writer's thread, inside its transaction: each body in a savepoint."""
    outcomes: list[BaseException | None] = []
    for statements in bodies:
        conn.execute("SAVEPOINT bridge_write")
        try:
            for query, args in statements:
                conn.execute(_PARAM.sub(r"?\1", query), args)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO bridge_write")
            outcomes.append(exc)
        else:
            outcomes.append(None)
        with contextlib.suppress(sqlite3.Error):
            conn.execute("RELEASE bridge_write")
    return outcomes


def use_group_commit(db: Database, writer: SqliteWriter | None) -> GroupCommit | None:
    """From now on, :func:`write` on ``db`` goes through ``writer`` (SQLite: the Kalandra
    store's writer on the same file); None: mautrix's pool, one transaction per write."""
    if writer is None:
        _GROUPS.pop(db, None)
        return None
    group = _GROUPS[db] = GroupCommit(writer)
    return group


async def write(db: Database, statements: Sequence[Statement]) -> None:
    """``statements`` in one transaction: grouped with others on SQLite (see the module's
    docstring), else a transaction of mautrix's pool."""
    group = _GROUPS.get(db)
    if group is not None:
        await group.write(statements)
        return
    async with transaction(db) as conn:
        for query, args in statements:
            await conn.execute(query, *args)
