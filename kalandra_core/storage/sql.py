"""``SqlStore``: the :class:`~kalandra_core.storage.base.Store` on SQLite (aiosqlite) and
PostgreSQL (asyncpg) through SQLAlchemy Core's async engine (tables in ``schema``, the frame
log's statements and conflict detection in ``sql_log``).

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed append survives kill -9 and power
loss), foreign keys on and a busy timeout. Writes go through one connection that opens every
transaction with ``BEGIN IMMEDIATE`` (the write lock is taken up front, so a transaction never
fails half-way on a lock it could not upgrade); reads use a small pool of read-only connections,
each read in one snapshot. ``append`` skips SQLAlchemy there: ``sqlite_writer.SqliteWriter`` runs
the whole transaction on a plain ``sqlite3`` connection in one hop to its thread, and the other
writes hold that thread while they run so the two writer connections never contend.
PostgreSQL uses one pool for both and its own durability settings (``open`` warns when
``fsync`` or ``synchronous_commit`` is off).

Nothing here logs tokens, keys or payloads.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..private_files import make_sqlite_private
from ..proto import Handshake
from . import migrations, sql_lease, sql_log, sql_media, sqlite_media
from . import schema as db
from .base import (
    LOGIN_CODE_MAX_TTL,
    AlreadyExists,
    BanRecord,
    LeaseGrant,
    LogEntry,
    MediaPut,
    MemberAccount,
    NotFound,
    OverQuota,
    Role,
    Room,
    RoomChanges,
    RoomMember,
    RoomState,
    Store,
    StoredFrame,
    StoreError,
    Welcome,
    check_login_code_ttl,
    device_token,
    login_code_hash,
    make_login_code,
    normalize_login_code,
)
from .sqlite_writer import SqliteWriter, sqlite_engine
from .urls import engine_name, sqlalchemy_url

log = logging.getLogger(__name__)

_PG_POOL: Final = 10


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@asynccontextmanager
async def _store_errors() -> AsyncIterator[None]:
    """Database failures surface as StoreError (callers recover from those); IntegrityError
    passes through for the methods that turn it into AlreadyExists or NotFound. A server that
    refuses connections (restarting) raises plain OSError from the driver, not through
    SQLAlchemy's wrapping: a database failure too."""
    try:
        yield
    except IntegrityError:
        raise
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc


def _account(row: Any) -> MemberAccount:
    key = None if row.signature_key is None else bytes(row.signature_key)
    return MemberAccount(row.member_id, row.name, key, row.created_at)


class SqlStore:
    """The homeserver store; create it with :meth:`open`."""

    def __init__(
        self, writer: AsyncEngine, reader: AsyncEngine, fast: SqliteWriter | None = None
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._fast = fast  # SQLite only: the one-hop append
        self._pg = writer.dialect.name == "postgresql"  # frames alone: one statement (sql_log)

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> SqlStore:
        """Connect to ``url`` (``sqlite:///path`` or ``postgresql://...``), first upgrading
        the schema to head unless ``migrate`` is False."""
        full = sqlalchemy_url(url)
        if engine_name(url) == "sqlite" and make_url(full).database in (None, "", ":memory:"):
            raise ValueError("SqlStore needs an SQLite file, not an in-memory database")
        if engine_name(url) == "sqlite":
            path = make_url(full).database
            assert path is not None
            make_sqlite_private(path)  # 0600 whatever the umask (it holds tokens, sealed keys)
        if migrate:
            await migrations.upgrade(url)
        if engine_name(url) == "sqlite":
            store = cls(sqlite_engine(full, writer=True), sqlite_engine(full, writer=False))
        else:
            engine = create_async_engine(
                full, pool_size=_PG_POOL, max_overflow=_PG_POOL, hide_parameters=True
            )
            store = cls(engine, engine)
        try:
            await store._first_connect()
            if engine_name(url) == "sqlite":
                path = make_url(full).database
                assert path is not None
                store._fast = await SqliteWriter.open(path)
        except BaseException:
            await store.close()
            raise
        return store

    async def _first_connect(self) -> None:
        """SQLite: the writer's pragmas switch the file to WAL before any reader opens it.
        PostgreSQL: warn when the server is set up to lose acknowledged commits."""
        async with self._writer.connect() as conn:
            if conn.dialect.name != "postgresql":
                return
            for setting in ("fsync", "synchronous_commit"):
                value = await conn.scalar(sa.text(f"SHOW {setting}"))
                if value == "off":
                    log.warning("PostgreSQL %s is off: acknowledged frames may be lost", setting)

    @property
    def sqlite_writer(self) -> SqliteWriter | None:
        """SQLite: the connection and thread every write of this store goes through, for a
        process that writes its own tables in the same file without meeting this store on the
        file lock (None on PostgreSQL)."""
        return self._fast

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        if self._fast is None:
            async with _store_errors(), self._writer.begin() as conn:
                yield conn
            return
        async with self._fast.exclusive(), _store_errors(), self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with _store_errors(), self._reader.begin() as conn:
            yield conn

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

    # --- accounts ----------------------------------------------------------------------------
    async def create_member(self, name: str) -> MemberAccount:
        created_at = _now_ms()
        for _ in range(8):
            member_id = secrets.randbits(64)
            if member_id == 0:
                continue
            try:
                async with self._write() as conn:
                    await conn.execute(
                        db.members.insert().values(
                            member_id=member_id, name=name, created_at=created_at
                        )
                    )
            except IntegrityError:
                if await self.find_member(name) is not None:
                    raise AlreadyExists(f"member name {name!r} is taken") from None
                continue  # a random id collided; draw again
            return MemberAccount(member_id, name, None, created_at)
        raise StoreError("could not allocate a member id")

    async def get_member(self, member_id: int) -> MemberAccount | None:
        async with self._read() as conn:
            row = (
                await conn.execute(db.members.select().where(db.members.c.member_id == member_id))
            ).first()
        return None if row is None else _account(row)

    async def find_member(self, name: str) -> MemberAccount | None:
        async with self._read() as conn:
            row = (
                await conn.execute(db.members.select().where(db.members.c.name == name))
            ).first()
        return None if row is None else _account(row)

    async def list_members(self) -> list[MemberAccount]:
        async with self._read() as conn:
            rows = (await conn.execute(db.members.select().order_by(db.members.c.name))).all()
        return [_account(row) for row in rows]

    async def set_signature_key(self, member_id: int, key: bytes) -> None:
        async with self._write() as conn:
            result = await conn.execute(
                db.members.update()
                .where(db.members.c.member_id == member_id)
                .values(signature_key=key)
            )
            if result.rowcount != 1:
                raise NotFound(f"member {member_id}")

    async def issue_token(self, member_id: int) -> str:
        token = device_token()
        try:
            async with self._write() as conn:
                await conn.execute(
                    db.device_tokens.insert().values(
                        token_hash=_token_hash(token), member_id=member_id, created_at=_now_ms()
                    )
                )
        except IntegrityError:
            raise NotFound(f"member {member_id}") from None
        return token

    async def authenticate(self, token: str) -> int | None:
        async with self._read() as conn:
            member_id: int | None = await conn.scalar(
                sa.select(db.device_tokens.c.member_id).where(
                    db.device_tokens.c.token_hash == _token_hash(token),
                    db.device_tokens.c.revoked_at.is_(None),
                )
            )
        return member_id

    async def revoke_tokens(self, member_id: int) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                db.device_tokens.update()
                .where(
                    db.device_tokens.c.member_id == member_id,
                    db.device_tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=_now_ms())
            )
        return result.rowcount

    async def issue_login_code(
        self, member_id: int, ttl_seconds: int = LOGIN_CODE_MAX_TTL, *, now_ms: int | None = None
    ) -> str:
        check_login_code_ttl(ttl_seconds)
        code = make_login_code(secrets.token_bytes(14))
        now = _now_ms() if now_ms is None else now_ms
        table = db.login_codes
        try:
            async with self._write() as conn:
                await conn.execute(table.delete().where(table.c.expires_at <= now))
                await conn.execute(
                    table.insert().values(
                        code_hash=login_code_hash(code),
                        member_id=member_id,
                        created_at=now,
                        expires_at=now + ttl_seconds * 1000,
                    )
                )
        except IntegrityError:
            raise NotFound(f"member {member_id}") from None
        return code

    async def redeem_login_code(self, code: str, now_ms: int) -> int | None:
        normal = normalize_login_code(code)
        if normal is None:
            return None
        table = db.login_codes
        # One DELETE ... RETURNING: of two concurrent redemptions only one gets the row.
        async with self._write() as conn:
            row = (
                await conn.execute(
                    table.delete()
                    .where(table.c.code_hash == login_code_hash(normal))
                    .returning(table.c.member_id, table.c.expires_at)
                )
            ).first()
        if row is None or row.expires_at <= now_ms:
            return None
        member_id: int = row.member_id
        return member_id

    # --- rooms ---------------------------------------------------------------------------------
    async def create_room(self, room: Room, creator: RoomMember) -> None:
        if len(room.room_id) != 16:
            raise ValueError("room ids are 16 bytes")
        try:
            async with self._write() as conn:
                await conn.execute(
                    db.rooms.insert().values(
                        room_id=room.room_id,
                        epoch=room.epoch,
                        next_log_index=room.next_log_index,
                        creator=room.creator,
                        created_at=room.created_at,
                        handshake=room.handshake.value,
                        group_id=room.group_id,
                        name=room.name,
                        topic=room.topic,
                    )
                )
                await conn.execute(
                    db.room_members.insert().values(sql_log.member_row(room.room_id, creator))
                )
        except IntegrityError:
            raise AlreadyExists(f"room {room.room_id.hex()}") from None

    async def load_room(self, room_id: bytes) -> RoomState | None:
        async with self._read() as conn:  # one snapshot for room, roster and bans
            row = (
                await conn.execute(db.rooms.select().where(db.rooms.c.room_id == room_id))
            ).first()
            if row is None:
                return None
            roster = await conn.execute(
                db.room_members.select().where(db.room_members.c.room_id == room_id)
            )
            bans = await conn.execute(
                db.room_bans.select().where(db.room_bans.c.room_id == room_id)
            )
            room = Room(
                room_id=room_id,
                epoch=row.epoch,
                next_log_index=row.next_log_index,
                creator=row.creator,
                created_at=row.created_at,
                handshake=Handshake(row.handshake),
                group_id=bytes(row.group_id),
                name=row.name,
                topic=row.topic,
            )
            return RoomState(
                room=room,
                members={
                    m.member_id: RoomMember(m.member_id, Role(m.role), m.leaf_index)
                    for m in roster
                },
                bans={
                    b.member_id: BanRecord(b.member_id, b.moderator_id, b.reason, b.expires_at)
                    for b in bans
                },
            )

    async def rooms_of(self, member_id: int) -> list[bytes]:
        async with self._read() as conn:
            rows = await conn.execute(
                sa.select(db.room_members.c.room_id)
                .where(db.room_members.c.member_id == member_id)
                .order_by(db.room_members.c.room_id)
            )
            return [bytes(r.room_id) for r in rows]

    async def log_heads(self) -> dict[bytes, int]:
        async with self._read() as conn:
            rows = await conn.execute(sa.select(db.rooms.c.room_id, db.rooms.c.next_log_index))
            return {bytes(r.room_id): int(r.next_log_index) for r in rows}

    async def update_room_metadata(self, room_id: bytes, *, name: str, topic: str) -> None:
        async with self._write() as conn:
            result = await conn.execute(
                db.rooms.update()
                .where(db.rooms.c.room_id == room_id)
                .values(name=name, topic=topic)
            )
            if result.rowcount != 1:
                raise NotFound(f"room {room_id.hex()}")

    # --- the log ---------------------------------------------------------------------------------
    async def append(
        self,
        room_id: bytes,
        entries: Sequence[LogEntry],
        changes: RoomChanges | None = None,
        *,
        fence: int | None = None,
    ) -> None:
        """Frames and changes in one transaction; ``entries`` may be empty (changes only)."""
        changes = changes or RoomChanges()
        commit_epoch = sql_log.check_batch(room_id, entries, changes)  # before taking the lock
        if self._fast is not None and fence is None:
            await self._fast.append(room_id, entries, changes, commit_epoch)
            return
        if self._pg and fence is None and sql_log.frames_only(entries, changes):
            async with _store_errors(), self._writer.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await sql_log.append_frames_pg(conn, room_id, entries)
            return
        async with self._write() as conn:
            if fence is not None:
                await sql_lease.check_fence(conn, room_id, fence)
            await sql_log.append(conn, room_id, entries, changes)

    async def load_frames(self, room_id: bytes, from_index: int, limit: int) -> list[StoredFrame]:
        async with self._read() as conn:
            return await sql_log.load_frames(conn, room_id, from_index, limit)

    async def commits_between(
        self, room_id: bytes, from_epoch: int, to_epoch: int
    ) -> list[StoredFrame]:
        async with self._read() as conn:
            return await sql_log.commits_between(conn, room_id, from_epoch, to_epoch)

    async def redact(self, room_id: bytes, log_index: int, *, fence: int | None = None) -> bool:
        async with self._write() as conn:
            if fence is not None:
                await sql_lease.check_fence(conn, room_id, fence)
            return await sql_log.redact(conn, room_id, log_index)

    # --- welcome mailbox ---------------------------------------------------------------------
    async def put_welcome(
        self, room_id: bytes, recipient_id: int, frame: bytes, *, fence: int | None = None
    ) -> int:
        try:
            async with self._write() as conn:
                if fence is not None:
                    await sql_lease.check_fence(conn, room_id, fence)
                result = await conn.execute(
                    db.welcomes.insert().values(
                        room_id=room_id,
                        recipient_id=recipient_id,
                        frame=frame,
                        created_at=_now_ms(),
                    )
                )
        except IntegrityError:
            raise NotFound(f"room {room_id.hex()}") from None
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    async def pending_welcomes(self, recipient_id: int) -> list[Welcome]:
        async with self._read() as conn:
            rows = await conn.execute(
                db.welcomes.select()
                .where(db.welcomes.c.recipient_id == recipient_id)
                .order_by(db.welcomes.c.welcome_id)
            )
            return [
                Welcome(r.welcome_id, bytes(r.room_id), r.recipient_id, bytes(r.frame))
                for r in rows
            ]

    async def welcome_delivered(self, welcome_id: int) -> None:
        async with self._write() as conn:
            await conn.execute(db.welcomes.delete().where(db.welcomes.c.welcome_id == welcome_id))

    # --- key packages and group info ---------------------------------------------------------
    async def publish_key_packages(self, member_id: int, key_packages: Sequence[bytes]) -> int:
        unique = {hashlib.sha256(kp).digest(): kp for kp in key_packages}  # keeps first order
        created_at = _now_ms()
        try:
            async with self._write() as conn:
                if unique:
                    await conn.execute(
                        sql_log.dialect_insert(conn, db.key_packages).on_conflict_do_nothing(
                            index_elements=["member_id", "kp_hash"]
                        ),
                        [
                            {
                                "member_id": member_id,
                                "kp_hash": digest,
                                "key_package": kp,
                                "created_at": created_at,
                            }
                            for digest, kp in unique.items()
                        ],
                    )
                return await self._key_package_count(conn, member_id)
        except IntegrityError:
            raise NotFound(f"member {member_id}") from None

    async def set_last_resort_key_package(self, member_id: int, key_package: bytes) -> None:
        table = db.last_resort_key_packages
        try:
            async with self._write() as conn:
                ins = sql_log.dialect_insert(conn, table).values(
                    member_id=member_id, key_package=key_package, created_at=_now_ms()
                )
                await conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=["member_id"],
                        set_={
                            "key_package": ins.excluded.key_package,
                            "created_at": ins.excluded.created_at,
                        },
                    )
                )
        except IntegrityError:
            raise NotFound(f"member {member_id}") from None

    async def take_key_package(self, member_id: int) -> bytes | None:
        oldest = (
            sa.select(db.key_packages.c.kp_id)
            .where(db.key_packages.c.member_id == member_id)
            .order_by(db.key_packages.c.kp_id)
            .limit(1)
            .with_for_update(skip_locked=True)  # concurrent takers get different packages
            .scalar_subquery()
        )
        async with self._write() as conn:
            taken = await conn.scalar(
                db.key_packages.delete()
                .where(db.key_packages.c.kp_id == oldest)
                .returning(db.key_packages.c.key_package)
            )
            if taken is None:  # none left: the last-resort one, which stays
                taken = await conn.scalar(
                    sa.select(db.last_resort_key_packages.c.key_package).where(
                        db.last_resort_key_packages.c.member_id == member_id
                    )
                )
        return None if taken is None else bytes(taken)

    async def key_package_count(self, member_id: int) -> int:
        async with self._read() as conn:
            return await self._key_package_count(conn, member_id)

    @staticmethod
    async def _key_package_count(conn: AsyncConnection, member_id: int) -> int:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(db.key_packages)
            .where(db.key_packages.c.member_id == member_id)
        )
        return int(count or 0)

    async def put_group_info(
        self, room_id: bytes, epoch: int, group_info: bytes, *, fence: int | None = None
    ) -> None:
        """Keep the newest: a GroupInfo for an older epoch never replaces a newer one."""
        table = db.group_info
        try:
            async with self._write() as conn:
                if fence is not None:
                    await sql_lease.check_fence(conn, room_id, fence)
                ins = sql_log.dialect_insert(conn, table).values(
                    room_id=room_id, epoch=epoch, group_info=group_info
                )
                await conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=["room_id"],
                        set_={"epoch": ins.excluded.epoch, "group_info": ins.excluded.group_info},
                        where=table.c.epoch <= ins.excluded.epoch,
                    )
                )
        except IntegrityError:
            raise NotFound(f"room {room_id.hex()}") from None

    async def get_group_info(self, room_id: bytes) -> tuple[int, bytes] | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(db.group_info.c.epoch, db.group_info.c.group_info).where(
                        db.group_info.c.room_id == room_id
                    )
                )
            ).first()
        return None if row is None else (row.epoch, bytes(row.group_info))

    # --- room leases (cluster mode; PostgreSQL only) -------------------------------------------
    def _cluster_engine(self) -> None:
        if self._writer.dialect.name != "postgresql":
            raise StoreError("room leases need PostgreSQL (cluster mode)")

    async def acquire_lease(self, room_id: bytes, node: str, seconds: float) -> LeaseGrant:
        self._cluster_engine()
        async with self._write() as conn:
            return await sql_lease.acquire(conn, room_id, node, seconds)

    async def renew_leases(self, node: str, held: dict[bytes, int], seconds: float) -> list[bytes]:
        self._cluster_engine()
        async with self._write() as conn:
            return await sql_lease.renew(conn, node, held, seconds)

    async def release_lease(self, room_id: bytes, node: str, token: int) -> None:
        self._cluster_engine()
        async with self._write() as conn:
            await sql_lease.release(conn, room_id, node, token)

    async def lease_owner(self, room_id: bytes) -> str | None:
        self._cluster_engine()
        async with self._read() as conn:
            return await sql_lease.owner(conn, room_id)

    async def hand_over_lease(
        self, room_id: bytes, node: str, token: int, to: str, seconds: float
    ) -> bool:
        self._cluster_engine()
        async with self._write() as conn:
            return await sql_lease.hand_over(conn, room_id, node, token, to, seconds)

    async def node_alive(self, node: str, seconds: float) -> dict[str, int]:
        self._cluster_engine()
        async with self._write() as conn:
            return await sql_lease.alive(conn, node, seconds)

    async def leases_of(self, node: str) -> list[bytes]:
        self._cluster_engine()
        async with self._read() as conn:
            return await sql_lease.leases_of(conn, node)

    async def record_bridge_bot(self, member_id: int, mxid: str) -> None:
        async with self._write() as conn:
            await sql_lease.record_bridge_bot(conn, member_id, mxid)

    async def bridge_bot(self) -> tuple[int, str] | None:
        async with self._read() as conn:
            return await sql_lease.bridge_bot(conn)

    async def forget_bridge_bot(self) -> bool:
        async with self._write() as conn:
            return await sql_lease.forget_bridge_bot(conn)

    # --- media ---------------------------------------------------------------------------------
    async def media_put(
        self,
        room_id: bytes,
        digest: bytes,
        data: bytes,
        uploader_id: int,
        quota: int | None = None,
    ) -> bool:
        try:
            async with self._write() as conn:
                return await sql_media.put(
                    conn, room_id, digest, data, uploader_id, _now_ms(), quota
                )
        except IntegrityError:
            raise NotFound(f"room {room_id.hex()}") from None

    async def media_put_many(
        self, puts: Sequence[MediaPut], quota: int | None = None
    ) -> list[bool | NotFound | OverQuota]:
        if not puts:
            return []
        now = _now_ms()
        if self._fast is not None:
            fast = self._fast
            return await fast.transaction(
                lambda conn: sqlite_media.put_many(conn, puts, now, quota)
            )
        async with self._write() as conn:
            return await sql_media.put_many(conn, puts, now, quota)

    async def media_usage(self, uploader_id: int) -> int:
        async with self._read() as conn:
            return await sql_media.usage(conn, uploader_id)

    async def media_get(self, room_id: bytes, digest: bytes) -> bytes | None:
        async with self._read() as conn:
            return await sql_media.get(conn, room_id, digest)

    async def media_get_many(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes | None]:
        if self._fast is not None:
            fast = self._fast
            return await fast.read(lambda conn: sqlite_media.get_many(conn, room_id, digests))
        async with self._read() as conn:
            return await sql_media.get_many(conn, room_id, digests)

    async def media_present(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes]:
        async with self._read() as conn:
            return await sql_media.present(conn, room_id, digests)

    async def media_release(
        self, room_id: bytes, digests: Sequence[bytes], uploader_id: int | None
    ) -> list[bytes]:
        async with self._write() as conn:
            return await sql_media.release(conn, room_id, digests, uploader_id)

    async def media_refcount(self, digest: bytes) -> int:
        async with self._read() as conn:
            return await sql_media.refcount(conn, digest)


if TYPE_CHECKING:

    def _conforms(store: SqlStore) -> Store:  # mypy checks SqlStore against the protocol
        return store
