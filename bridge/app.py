"""The bridge process: mautrix's Bridge lifecycle with the Kalandra homeserver embedded.

Start-up order: config upgrade and checks, alembic migrations of our tables, the Kalandra
server (sequencer, storage, native listeners), then mautrix (its stores' own upgrade tables in
the same database, the appservice listener, the homeserver connection check, the bot).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from typing import Any

from alembic.util import CommandError
from mautrix.bridge import BasePortal, BasePuppet, Bridge
from mautrix.types import RoomID, UserID
from mautrix.util.async_db import Database, PostgresDatabase, UpgradeTable
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from kalandra_core.private_files import make_sqlite_private
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.settings import ConfigError
from kalandra_core.storage import migrations
from kalandra_core.storage.reachable import (
    DatabaseRefused,
    masked,
    outage,
    wait_for_database,
)
from kalandra_core.storage.sqlite_writer import BUSY_TIMEOUT_MS
from kalandra_core.storage.urls import sqlalchemy_url

from . import __version__, diagnostics, health, log_noise, metrics, permissions
from .appservice import as_auth, catch_up, self_ping
from .appservice.handler import MatrixHandler
from .appservice.transactions import TransactionGate
from .bot import BotIdentityLost, KalandraBot
from .config import EXAMPLE_CONFIG, Config
from .context import GhostEncryption, Impersonator
from .db import group_commit
from .db.sqlite_txn import install_immediate_transactions
from .db.state_store import BridgeStateStore
from .encryption import e2ee, msc4350
from .matrix_users import MatrixUser
from .members.bridged_users import BridgedUsers
from .members.puppet import Puppets
from .portal import Portals
from .run_state import RunState
from .web.provisioning import ProvisioningAPI


class _DatabaseGone(Exception):
    """mautrix's database start met an outage: wait for the database and start it again."""


class KalandraBridge(Bridge):
    module = "bridge"
    name = "kalandra-bridge"
    command = "python -m bridge"
    description = "Kalandra homeserver and Matrix appservice bridge"
    repo_url = ""
    version = __version__
    markdown_version = __version__
    config_class = Config
    matrix_class = MatrixHandler
    state_store_class = BridgeStateStore  # a room's member writes one at a time
    # Empty on purpose: the bridge's tables are in alembic/ with the rest of ours. mautrix's
    # state and crypto stores keep their own version tables (mx_version, crypto_version).
    upgrade_table = UpgradeTable()

    config: Config
    matrix: MatrixHandler
    kalandra: RunningServer | None = None
    bot: KalandraBot
    matrix_ready: asyncio.Event  # set once the homeserver connection is checked
    _reloads: set[asyncio.Task[None]]  # SIGHUP reloads running (kept referenced)
    gate: TransactionGate
    _catch_up: asyncio.Task[None] | None = None  # catch_up.watch
    ghost_devices: GhostEncryption | None = None  # bridge.encryption.ghost_devices (e2ee.install)
    impersonation: Impersonator | None = None  # bridge.encryption.msc4350, if used (start)
    e2ee_self_sign = False  # bridge.encryption.self_sign, done by e2ee.self_sign, not mautrix
    _ghost: re.Pattern[str]

    @property
    def base_config_path(self) -> str:
        return str(EXAMPLE_CONFIG)

    def prepare_config(self) -> None:
        if not os.path.isfile(self.args.config):
            sys.exit(
                f"{self.args.config}: no such config file. Copy {EXAMPLE_CONFIG.name} there and"
                " set homeserver.address and homeserver.domain."
            )
        super().prepare_config()
        for key in self.config.unsaved_secrets:
            sys.exit(
                f"{self.args.config}: {key} was generated but could not be saved"
                " (-n, or the file is not writable); it would be lost at the next start."
            )

    def check_config(self) -> None:
        super().check_config()  # example values (mautrix's ForbiddenDefault) exit with 11
        try:
            self.config.core  # noqa: B018 - validates database.url and the server section
        except ConfigError as exc:
            self.log.fatal("Configuration error: %s", exc)
            sys.exit(11)
        for path in self.config.dropped:
            self.log.warning("Config option %s is not in %s: ignored", path, EXAMPLE_CONFIG.name)

    def prepare_db(self) -> None:
        url = self.config.mautrix_database_url
        opts: dict[str, Any] = dict(self.config["appservice.database_opts"] or {})
        if url.startswith("sqlite:"):
            # Created 0600 before SQLite makes it (whatever the umask), and its -wal and -shm
            # with it (SQLite gives them the database file's mode).
            path = make_url(sqlalchemy_url(self.config.core.database)).database
            if path:
                make_sqlite_private(path)
            # As durable as the Kalandra store on the same file (mautrix defaults to NORMAL),
            # and as patient for its lock.
            opts.setdefault(
                "init_commands",
                ["PRAGMA synchronous = FULL", f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"],
            )
            install_immediate_transactions()  # the store commits between mautrix's statements
        else:
            # mautrix exits on asyncpg's "internal client error", which a connection cut by a
            # PostgreSQL restart can raise: the failing call is retried like any database error.
            opts.setdefault("meow_exit_on_ice", False)
        self.db = Database.create(
            url,
            upgrade_table=self.upgrade_table,
            db_args=opts,
            owner_name=self.name,
            ignore_foreign_tables=self.args.ignore_foreign_tables,
        )

    def prepare_bridge(self) -> None:
        self.run_state = RunState()
        super().prepare_bridge()
        log_noise.install()  # after the logging config
        e2ee.install(self)  # the crypto state store reads our portals' room state
        prefix, suffix = self.matrix.user_id_prefix, self.matrix.user_id_suffix
        self._ghost = re.compile(f"{re.escape(prefix)}.+{re.escape(suffix)}")
        self.matrix_ready = asyncio.Event()
        self.portals = Portals(self)
        self.bridged_users = BridgedUsers(self)
        self.puppets = Puppets(self)
        self._reloads = set()
        self.gate = TransactionGate(self)
        self.gate.install()  # acknowledge transactions only when done
        # After the gate: counts what Synapse is answered.
        metrics.install(
            self.az, self._queue_depths, lambda mxid: self.portals.by_mxid(mxid) is not None
        )
        health.install(self)
        self_ping.install(self)  # the start-up check: a ping that arrived is proof enough
        as_auth.install(self)  # outermost: the token before anything reads a body
        if self.config["bridge.provisioning.enabled"]:
            ProvisioningAPI(self).install()

    async def start(self) -> None:
        diagnostics.install()  # kill -USR1: what every task waits on, in the log
        # mautrix turns SIGTERM/SIGINT into a KeyboardInterrupt raised wherever the loop is,
        # which can land inside a task (a traceback at exit, a task cut mid-step). A stop
        # request through the loop instead: the same orderly stop, nothing interrupted.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested)
        core = self.config.core
        if not await self._start_kalandra(core.database):
            sys.exit(0)  # stopped while waiting for the database: a clean stop
        assert self.kalandra is not None
        # SQLite: the bridge's per-event writes share the store's writer (db/group_commit.py).
        group_commit.use_group_commit(self.db, self.kalandra.store.sqlite_writer)
        self.run_state.e2ee.resumed.clear()  # before the first transaction (e2ee.hold)
        await super().start()
        if self.ghost_devices is not None:
            await self.ghost_devices.start()
        await e2ee.self_sign(self)
        msc4350.setup(self, e2ee.manager(self))  # needs the homeserver's /versions
        self.matrix_ready.set()
        # What Matrix users sent while the bridge was down: now, and after every outage.
        watch = catch_up.watch(self, self.gate.catch_up)
        self._catch_up = asyncio.create_task(watch, name="catch-up")
        e2ee.refresh_device_lists(self)  # device changes while the bridge was down
        try:
            await e2ee.resume_key_waits(self)  # room keys still missing before the restart
        except Exception as exc:  # the bridge runs on; those messages stay failed
            self.log.warning("waits for room keys not resumed (%s)", type(exc).__name__)
        finally:
            self.run_state.e2ee.resumed.set()  # (already, unless it failed or found none)
        # Portals whose Matrix room was not finished before a stop (found by alias or made).
        for portal in self.portals.all():
            if portal.mxid is None:
                await portal.ensure_matrix_room(invite=[])

    async def _start_kalandra(self, url: str) -> bool:
        """Wait for the database (PostgreSQL down at start-up is an outage, not an error),
        migrate it and start the Kalandra server; False if a stop was requested meanwhile. A
        database that refuses us, or a migration that fails, is a configuration error: exit 25
        with the reason, no retry."""
        while True:
            try:
                if not await wait_for_database(url, self._stop_task):
                    return False
                await migrations.upgrade(url)
                self.kalandra = await start_server(self.config.core.server)
                return True
            except DatabaseRefused as exc:
                self.log.fatal("Cannot use the database: %s", exc)
            except Exception as exc:
                if outage(exc):  # gone again since the probe: wait again (not in a busy loop)
                    self.log.warning("Database lost during start-up (%s)", type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                if not isinstance(exc, SQLAlchemyError | CommandError):
                    raise
                self.log.fatal(
                    "Migrating or opening the database %s failed: %s: %s",
                    masked(url),
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
            sys.exit(25)

    def _reload_requested(self) -> None:
        task = asyncio.create_task(permissions.reload(self), name="reload-permissions")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _stop_requested(self) -> None:
        if not self._stop_task.done():
            self.manual_stop(0)

    def _log_db_error(self, e: Exception) -> None:
        if outage(e):  # mautrix's stores met the database gone again since ours started
            raise _DatabaseGone from e
        super()._log_db_error(e)  # a refusal: mautrix's message, exit 25

    async def start_db(self) -> None:
        while True:
            try:
                await super().start_db()
                break
            except _DatabaseGone:
                if isinstance(self.db, PostgresDatabase):  # its pool made before the cut
                    await self.db.stop()
                    self.db._pool = None  # start() refuses to run twice otherwise
                if not await wait_for_database(self.config.core.database, self._stop_task):
                    sys.exit(0)
        # The bot's Kalandra side needs the database (its state, the portals), not Matrix:
        # its client connects and resyncs now; portals send once matrix_ready is set.
        assert self.kalandra is not None
        self.bot = KalandraBot(self, self.kalandra)
        try:
            await self.bot.start()
        except BotIdentityLost as exc:  # an operator's decision, not a crash: no traceback
            self.log.fatal("Cannot start the bridge's bot: %s", exc)
            sys.exit(13)

    async def stop(self) -> None:
        self.gate.stop()  # transactions in progress are answered "retry" rather than waited for
        if self._catch_up is not None:
            self._catch_up.cancel()
        self.gate.stop_catching_up()
        await self._stop_bot()
        await e2ee.stop(self)
        await super().stop()
        await self._stop_kalandra()

    async def system_exit(self) -> None:
        await self._stop_bot()
        await self._stop_kalandra()
        await super().system_exit()

    async def _stop_bot(self) -> None:
        bot = getattr(self, "bot", None)
        if bot is not None:
            del self.bot
            await bot.stop()

    async def _stop_kalandra(self) -> None:
        if self.kalandra is not None:
            server, self.kalandra = self.kalandra, None
            group_commit.use_group_commit(self.db, None)
            await server.close()

    # --- mautrix's getters: users only, for now ---------------------------------------------

    async def get_user(self, user_id: UserID, create: bool = True) -> MatrixUser | None:
        return self.matrix.users.get(user_id)

    async def get_portal(self, room_id: RoomID) -> BasePortal | None:
        return None

    async def get_puppet(self, user_id: UserID, create: bool = False) -> BasePuppet | None:
        return None

    async def get_double_puppet(self, user_id: UserID) -> BasePuppet | None:
        return None

    def _queue_depths(self) -> tuple[int, int]:
        depths = [p.queue_depths() for p in self.portals.all()]
        return sum(d[0] for d in depths), sum(d[1] for d in depths)

    def is_bridge_ghost(self, user_id: UserID) -> bool:
        return self._ghost.fullmatch(user_id) is not None

    async def count_logged_in_users(self) -> int:
        return 0
