"""Persistence: the homeserver's :class:`Store` (interface and records in ``base``), its SQL
implementation :class:`SqlStore` for SQLite and PostgreSQL (``sql``, ``sql_log``, tables in
``schema``), database URLs (``urls``) and schema migrations (``migrations``; the history itself
lives in ``alembic/``)."""

from .base import (
    AlreadyExists,
    AppendConflict,
    BanRecord,
    Fenced,
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
)
from .sql import SqlStore

__all__ = [
    "AlreadyExists",
    "AppendConflict",
    "BanRecord",
    "Fenced",
    "LeaseGrant",
    "LogEntry",
    "MediaPut",
    "MemberAccount",
    "NotFound",
    "OverQuota",
    "Role",
    "Room",
    "RoomChanges",
    "RoomMember",
    "RoomState",
    "SqlStore",
    "Store",
    "StoreError",
    "StoredFrame",
    "Welcome",
]
