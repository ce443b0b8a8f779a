"""What the bridge's components need of the bridge, as one small interface.

The bridge process (app.py) is the one implementation. Components name these Protocols rather
than the process class, so that none of them imports the wiring: the import graph then runs
one way (app → components → this module), and a unit test can hand a component only the parts
it uses. Everything here is a type; importing this module costs nothing at run time.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mautrix.appservice import AppService
    from mautrix.bridge.e2ee import EncryptionManager
    from mautrix.types import Event, UserID
    from mautrix.util.async_db import Database

    from kalandra_core.client import events as ev
    from kalandra_core.client.core import ClientCore
    from kalandra_core.client.driver import Client
    from kalandra_core.server.app import RunningServer

    from .bot_state import BotState
    from .config import Config
    from .ghost_devices import GhostDevices
    from .routed import Item


class History(Protocol):
    """Where the bot keeps what rooms without a portal say, for their future portal."""

    def put(self, item: ev.Event) -> None: ...


class BotAccount(Protocol):
    """The bridge bot's Kalandra member: its client, its saved state, and the queue that hands
    what it receives to the portals in log order."""

    state: BotState
    client: Client | None  # None until the bot has started
    commit_lock: asyncio.Lock  # one commit of the bot's at a time

    @property
    def member_id(self) -> int: ...

    @property
    def core(self) -> ClientCore: ...

    @property
    def history(self) -> History | None: ...

    def route(self, item: Item) -> None: ...


class MatrixSide(Protocol):
    """The bridge's handler of Matrix events, as far as components call it."""

    user_id_prefix: str
    user_id_suffix: str
    e2ee: EncryptionManager | None

    async def int_handle_event(self, evt: Event, was_encrypted: bool = False) -> None: ...


class BridgeContext(Protocol):
    """The bridge as its components see it."""

    e2ee_self_sign: bool  # bridge.encryption.self_sign, set by e2ee.install
    ghost_devices: GhostDevices | None  # bridge.encryption.ghost_devices, set by e2ee.install

    @property
    def config(self) -> Config: ...

    @property
    def db(self) -> Database: ...

    @property
    def az(self) -> AppService: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def kalandra(self) -> RunningServer | None: ...

    @property
    def bot(self) -> BotAccount: ...

    @property
    def matrix(self) -> MatrixSide: ...

    @property
    def matrix_ready(self) -> asyncio.Event: ...

    def is_bridge_ghost(self, user_id: UserID) -> bool: ...
