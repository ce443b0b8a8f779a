"""The bridge's tables (created by alembic/versions/0003_bridge.py), through mautrix's
``Database`` pool: the one mautrix's state and crypto stores already use on ``database.url``.

Why that pool and not a SQLAlchemy engine of our own: it is already open on the same database,
its ``$1`` placeholders run on SQLite and PostgreSQL alike, and on SQLite one pool means one
set of writer connections competing for the file lock instead of two. The per-event writes of
the hot path (records, dedupe marks, prepared frames, the bot's state) go through
``group_commit.py`` instead: on SQLite the Kalandra store's writer, so no lock is met at all,
and concurrent writes share one transaction. Each table has a small
module of async functions taking the ``Database``; secrets go in and out sealed
(``kalandra_core.crypto.sealed`` under ``bridge.mls_state_key``).
"""

from .client_state import ClientStateTable, SealedIdentity
from .dedupe import DedupeTable
from .message import MessageTable
from .outgoing import Outgoing, OutgoingTable, SendMark
from .portal import PortalRow, PortalTable
from .puppet import PuppetRow, PuppetTable
from .user import BridgedUserRow, BridgedUserTable

__all__ = [
    "BridgedUserRow",
    "BridgedUserTable",
    "ClientStateTable",
    "DedupeTable",
    "MessageTable",
    "Outgoing",
    "OutgoingTable",
    "PortalRow",
    "PortalTable",
    "PuppetRow",
    "PuppetTable",
    "SealedIdentity",
    "SendMark",
]
