"""SQLite plumbing for :class:`~kalandra_core.storage.sql.SqlStore`: the SQLAlchemy engines
(``sqlite_engine``) and :class:`SqliteWriter`, the fast path of ``append``.

Through SQLAlchemy's async layer and aiosqlite every statement of an append is a round trip to
aiosqlite's thread (BEGIN, UPDATE, two INSERTs, commit index, changes, COMMIT): 2-3 ms for a
transaction a bare ``sqlite3`` connection commits in about half a millisecond. ``SqliteWriter``
owns one plain ``sqlite3`` connection on one thread (a one-worker executor) and runs the whole
append transaction there in a single hop, with the statements, checks and errors of
``sql_log.append``.

Reads that move many bytes (media blocks, :meth:`SqliteWriter.read`) take one hop too, on a
read-only connection with a thread of its own, so they never wait behind a commit.

Appends of different rooms that wait for the thread together are committed together (group
commit): one transaction, one fsync, each append in a savepoint of its own, so one that fails
(a conflict, a room gone) is rolled back alone and the others commit. No append is answered
before the COMMIT that holds it returned; if the COMMIT fails, all of them fail.

The store's other writes keep their SQLAlchemy connection. So that the two connections never
meet on SQLite's file lock (whose busy handler sleeps in steps of 1, 2, 5, 10... ms instead of
waiting for the holder), those writes first park the writer thread (:meth:`exclusive`): every
write of one store, fast or not, runs in the executor's FIFO order. Other stores and processes
on the same file still serialize on the lock, with the busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .base import AppendConflict, LogEntry, NotFound, RoomChanges, StoreError
from .schema import u64_to_db

T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 10_000
# busy_timeout: another process (or a second store) holding the write lock makes us wait, not fail.
WRITER_PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
)
_READER_PRAGMAS: Final = (f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}", "PRAGMA query_only=ON")
_READERS: Final = 4


def sqlite_engine(url: str, *, writer: bool) -> AsyncEngine:
    """The SQLAlchemy engine of the store's writes (one connection, ``BEGIN IMMEDIATE``) or of
    its reads (a small read-only pool)."""
    engine = create_async_engine(
        url,
        pool_size=1 if writer else _READERS,
        max_overflow=0,
        pool_timeout=60,
        hide_parameters=True,  # never put tokens, keys or payloads into messages or logs
    )
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
    pragmas = WRITER_PRAGMAS if writer else _READER_PRAGMAS

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it skips it for SELECTs); see on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    event.listen(engine.sync_engine, "connect", on_connect)
    event.listen(engine.sync_engine, "begin", on_begin)
    return engine


# The statements of sql_log.append, in its order.
_CLAIM: Final = (
    "UPDATE rooms SET next_log_index = ?{epoch} WHERE room_id = ? AND next_log_index = ?"
)
_TOUCH: Final = "UPDATE rooms SET next_log_index = next_log_index{epoch} WHERE room_id = ?"
_NEXT_INDEX: Final = "SELECT next_log_index FROM rooms WHERE room_id = ?"
_INSERT_LOG: Final = (
    "INSERT INTO frame_log (room_id, log_index, opcode, sender_id, epoch, header)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_PAYLOAD: Final = (
    "INSERT INTO frame_payloads (room_id, log_index, payload) VALUES (?, ?, ?)"
)
_INSERT_COMMIT: Final = "INSERT INTO commit_index (room_id, epoch, log_index) VALUES (?, ?, ?)"
_REMOVE_MEMBER: Final = "DELETE FROM room_members WHERE room_id = ? AND member_id = ?"
_UPSERT_MEMBER: Final = (
    "INSERT INTO room_members (room_id, member_id, role, leaf_index) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (room_id, member_id)"
    " DO UPDATE SET role = excluded.role, leaf_index = excluded.leaf_index"
)
_LIFT_BAN: Final = "DELETE FROM room_bans WHERE room_id = ? AND member_id = ?"
_SET_BAN: Final = (
    "INSERT INTO room_bans (room_id, member_id, moderator_id, reason, expires_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id, member_id) DO UPDATE SET"
    " moderator_id = excluded.moderator_id, reason = excluded.reason,"
    " expires_at = excluded.expires_at"
)


def _append(
    conn: sqlite3.Connection,
    room_id: bytes,
    entries: Sequence[LogEntry],
    changes: RoomChanges,
    commit_epoch: int | None,
) -> None:
    """The body of the append transaction (the caller opened it and ends it)."""
    start = entries[0].log_index if entries else 0
    epoch = "" if changes.new_epoch is None else ", epoch = ?"
    extra = () if changes.new_epoch is None else (changes.new_epoch,)
    if entries:
        params: tuple[Any, ...] = (start + len(entries), *extra, room_id, start)
        claimed = conn.execute(_CLAIM.format(epoch=epoch), params)
    else:
        # Changes without frames: the no-op update proves the room exists (as in sql_log).
        claimed = conn.execute(_TOUCH.format(epoch=epoch), (*extra, room_id))
    if claimed.rowcount != 1:
        row = conn.execute(_NEXT_INDEX, (room_id,)).fetchone()
        if row is None:
            raise NotFound(f"room {room_id.hex()}")
        raise AppendConflict(room_id, row[0], start)
    if entries:
        conn.executemany(
            _INSERT_LOG,
            [
                (room_id, e.log_index, e.opcode, u64_to_db(e.sender_id), e.epoch, e.header)
                for e in entries
            ],
        )
        conn.executemany(_INSERT_PAYLOAD, [(room_id, e.log_index, e.payload) for e in entries])
        if commit_epoch is not None:
            conn.execute(_INSERT_COMMIT, (room_id, commit_epoch, changes.commit_log_index))
    # Removals and lifts before upserts and bans: a batch may remove and re-add one member.
    if changes.remove_members:
        conn.executemany(_REMOVE_MEMBER, [(room_id, u64_to_db(m)) for m in changes.remove_members])
    if changes.upsert_members:
        conn.executemany(
            _UPSERT_MEMBER,
            [
                (room_id, u64_to_db(m.member_id), int(m.role), m.leaf_index)
                for m in changes.upsert_members
            ],
        )
    if changes.lift_bans:
        conn.executemany(_LIFT_BAN, [(room_id, u64_to_db(m)) for m in changes.lift_bans])
    if changes.set_bans:
        conn.executemany(
            _SET_BAN,
            [
                (
                    room_id,
                    u64_to_db(b.member_id),
                    u64_to_db(b.moderator_id),
                    b.reason,
                    b.expires_at,
                )
                for b in changes.set_bans
            ],
        )


def _store_error(exc: BaseException) -> BaseException:
    """An append's failure as the SQLAlchemy path raises it: IntegrityError as SQLAlchemy's,
    other database failures and values no column can take as StoreError (messages never carry
    the parameters)."""
    if isinstance(exc, sqlite3.IntegrityError):
        error: BaseException = IntegrityError("append", None, exc, hide_parameters=True)
    elif isinstance(exc, sqlite3.Error):
        error = StoreError(f"database error: {type(exc).__name__}")
    elif isinstance(exc, ValueError):  # a u64 out of range, as U64's bind processor says
        error = StoreError("database error: ValueError")
    else:
        return exc
    error.__cause__ = exc
    return error


def _transaction(conn: sqlite3.Connection, body: Callable[[], None]) -> None:
    """BEGIN IMMEDIATE, ``body``, COMMIT; ROLLBACK on any error, raised as :func:`_store_error`
    says."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        body()
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # report the first failure
                conn.execute("ROLLBACK")
        error = _store_error(exc)
        if error is exc:
            raise
        raise error from exc


@dataclass(slots=True)
class _Append:
    room_id: bytes
    entries: Sequence[LogEntry]
    changes: RoomChanges
    commit_epoch: int | None
    future: asyncio.Future[None]


def _append_group(conn: sqlite3.Connection, group: list[_Append]) -> list[BaseException | None]:
    """Every append of ``group`` in one transaction, each in a savepoint: the outcome of each
    (None: committed). A database failure other than a constraint (disk full, I/O) fails all."""
    outcomes: list[BaseException | None] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for item in group:
            conn.execute("SAVEPOINT append")
            try:
                _append(conn, item.room_id, item.entries, item.changes, item.commit_epoch)
            except (AppendConflict, NotFound, sqlite3.IntegrityError, ValueError) as exc:
                conn.execute("ROLLBACK TO append")
                outcomes.append(_store_error(exc))
            else:
                outcomes.append(None)
            conn.execute("RELEASE append")
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # report the first failure
                conn.execute("ROLLBACK")
        return [_store_error(exc) for _ in group]
    return outcomes


class SqliteWriter:
    """One ``sqlite3`` connection (WAL, ``synchronous=FULL``, foreign keys, busy timeout) owned
    by one thread; create it with :meth:`open`."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kalandra-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched on the executor's thread only
        self._closed = False
        # Appends waiting for the thread; the first one queues the job that commits them all.
        self._waiting: list[_Append] = []
        self._waiting_lock = threading.Lock()
        # Reads that move many bytes (media blocks) in one hop, on a read-only connection of
        # their own thread: a block read never waits behind a commit's fsync.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kalandra-sqlite-r")
        self._read_conn: sqlite3.Connection | None = None  # touched on the reader's thread only

    @classmethod
    async def open(cls, path: str) -> SqliteWriter:
        writer = cls(path)
        try:
            await writer._run(writer._connect)
        except BaseException:
            await writer.close()
            raise
        return writer

    def _connect(self) -> None:
        conn = sqlite3.connect(
            self._path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )  # isolation_level None: we issue BEGIN and COMMIT ourselves
        try:
            for pragma in WRITER_PRAGMAS:
                conn.execute(pragma).close()
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return self._conn

    async def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` on the read-only connection, in one hop (one snapshot: a transaction)."""
        if self._closed:
            raise StoreError("the store is closed")

        def run() -> T:
            conn = self._read_conn
            if conn is None:
                conn = sqlite3.connect(
                    self._path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
                )
                for pragma in _READER_PRAGMAS:
                    conn.execute(pragma).close()
                self._read_conn = conn
            try:
                conn.execute("BEGIN")
                try:
                    return body(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"database error: {type(exc).__name__}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        # A call cancelled before its turn never runs; once running, it runs to its end (a
        # cancelled append may still commit, as it may when cancelled while COMMIT is in flight).
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def append(
        self,
        room_id: bytes,
        entries: Sequence[LogEntry],
        changes: RoomChanges,
        commit_epoch: int | None,
    ) -> None:
        """``sql_log.append`` in one hop, committed together with the appends of other rooms
        waiting at the same time; the batch was checked (``sql_log.check_batch``).

        A call cancelled before its group runs is left out of it; once its group runs, it may
        commit (as it may when cancelled while COMMIT is in flight)."""
        if self._closed:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        item = _Append(room_id, entries, changes, commit_epoch, loop.create_future())
        with self._waiting_lock:
            self._waiting.append(item)
            first = len(self._waiting) == 1
        if first:
            loop.run_in_executor(self._executor, self._commit_waiting, loop)
        await item.future

    def _commit_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread: commit every append waiting now, then answer each."""
        with self._waiting_lock:
            group, self._waiting = self._waiting, []
        group = [item for item in group if not item.future.cancelled()]
        if not group:
            return
        try:
            outcomes = _append_group(self._connection(), group)
        except StoreError as exc:  # closed
            outcomes = [exc] * len(group)

        def answer() -> None:
            for item, outcome in zip(group, outcomes, strict=True):
                if item.future.cancelled():
                    continue
                if outcome is None:
                    item.future.set_result(None)
                else:
                    item.future.set_exception(outcome)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(answer)

    async def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` in one transaction on the writer's connection, in one hop (errors as
        :meth:`append`'s)."""
        result: list[T] = []

        def run() -> None:
            conn = self._connection()
            _transaction(conn, lambda: result.append(body(conn)))

        await self._run(run)
        return result[0]

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the writer thread (idle, between transactions) while the body writes through
        another connection of this process."""
        if self._closed:
            yield
            return
        loop = asyncio.get_running_loop()
        parked: asyncio.Future[None] = loop.create_future()
        release = threading.Event()

        def arrived() -> None:
            if not parked.done():
                parked.set_result(None)

        def park() -> None:
            try:
                loop.call_soon_threadsafe(arrived)
            except RuntimeError:  # the loop is closed: nobody will release us
                return
            release.wait()

        loop.run_in_executor(self._executor, park)
        try:
            await parked
            yield
        finally:
            release.set()  # also when cancelled before the park ran: it then returns at once

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_connection() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        def close_reader() -> None:
            if self._read_conn is not None:
                self._read_conn.close()
                self._read_conn = None

        reader_closed = asyncio.get_running_loop().run_in_executor(self._reader, close_reader)

        done = False
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close_connection)
            done = True
        finally:
            # After the close job every earlier job has run: the thread is idle and joins now.
            self._executor.shutdown(wait=done)
            with contextlib.suppress(Exception):
                await reader_closed
            self._reader.shutdown(wait=True)
