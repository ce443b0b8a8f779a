"""What the bridge's components need of the bridge, as one small interface.

The bridge process (app.py) is the one implementation. Components name these Protocols rather
than the process class, so that none of them imports the wiring: the import graph then runs
one way (app → components → this module), and a unit test can hand a component only the parts
it uses. Everything here is a type; importing this module costs nothing at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mautrix.appservice import AppService, IntentAPI
    from mautrix.bridge.e2ee import EncryptionManager
    from mautrix.types import (
        JSON,
        EncryptedMegolmEventContent,
        Event,
        EventID,
        EventType,
        RoomAlias,
        RoomID,
        Serializable,
        UserID,
        VersionsResponse,
    )
    from mautrix.util.async_db import Database

    from kalandra_core.client import events as ev
    from kalandra_core.client.content import Content
    from kalandra_core.client.core import ClientCore
    from kalandra_core.client.driver import Client
    from kalandra_core.client.events import Message
    from kalandra_core.client.profile import Profile
    from kalandra_core.proto.frame import Frame
    from kalandra_core.server.app import RunningServer

    from .bot_state import BotState
    from .config import Config
    from .db import PortalRow
    from .portal_work import EventSlot, FromMatrix
    from .routed import Item
    from .run_state import RunState


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
    versions: VersionsResponse  # the homeserver's, once checked at start

    async def int_handle_event(self, evt: Event, was_encrypted: bool = False) -> None: ...


class Ghost(Protocol):
    """A native member's Matrix user (a ghost of the appservice)."""

    @property
    def member_id(self) -> int: ...

    @property
    def mxid(self) -> UserID: ...

    @property
    def intent(self) -> IntentAPI: ...

    @property
    def displayname(self) -> str: ...

    async def ensure_ready(self) -> None:
        """Registered on the homeserver, with its display name."""


class GhostDirectory(Protocol):
    async def get(self, member_id: int) -> Ghost: ...


class BridgedMember(Protocol):
    """A Matrix user's Kalandra member, whose keys the bridge holds (its puppet leaf)."""

    @property
    def mxid(self) -> UserID: ...

    @property
    def member_id(self) -> int: ...

    @property
    def core(self) -> ClientCore: ...  # frames only: no rooms, no MLS state

    token: str | None  # its device token, once issued

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ensure_in_room(self, room_id: bytes) -> None: ...

    async def send(self, room_id: bytes, content: Content, event_id: EventID) -> int:
        """Send as this member's leaf; the message's log index."""

    async def request(self, request_id: int, data: bytes) -> Frame: ...

    async def at_current_epoch(
        self, room_id: bytes, attempt: Callable[[], Awaitable[Frame]]
    ) -> int: ...

    def send_unanswered(self, data: bytes) -> bool: ...


class BridgedUserDirectory(Protocol):
    @property
    def member_ids(self) -> set[int]: ...  # every bridged user's member id

    def find(self, mxid: str) -> BridgedMember | None: ...

    async def get(self, mxid: UserID, permission: str) -> BridgedMember: ...

    async def load_member_ids(self) -> None: ...

    async def close_all(self) -> None: ...


class LateReports(Protocol):
    """A portal's status reports, as far as a late room key corrects them (encryption/e2ee.py)."""

    @property
    def late(self) -> set[EventID]: ...  # reported failed, being bridged late


class PortalFace(Protocol):
    """A portal (a Kalandra room and its Matrix room) as everything outside it sees it: the
    portal's features (relations, media, metadata, ...) and the Matrix and Kalandra sides work
    through these members only, never through the portal's own internals."""

    @property
    def bridge(self) -> BridgeContext: ...

    @property
    def row(self) -> PortalRow: ...  # the portal's database row, kept current

    @property
    def room_id(self) -> bytes: ...  # the Kalandra room

    @property
    def hex(self) -> str: ...

    @property
    def mxid(self) -> RoomID | None: ...  # the Matrix room, once made

    @property
    def room_mxid(self) -> RoomID: ...  # the Matrix room, where it must exist

    @property
    def alias(self) -> RoomAlias: ...

    @property
    def mx_status(self) -> LateReports: ...

    # --- the queue toward Matrix ---------------------------------------------------------------

    def enqueue(self, item: Item) -> None: ...

    async def to_matrix(
        self, message: Message, timestamp: int | None = None, *, looked_for: bool = False
    ) -> EventID | None:
        """Send ``message`` from its sender's ghost (None: not for Matrix)."""

    async def set_aside(self, message: Message, reason: str) -> EventID | None:
        """The homeserver refused ``message`` for good (``reason``): the notice that takes its
        place, to be recorded for it (None: no notice could be sent)."""

    async def records_flushed(self) -> None:
        """Return once every message sent to Matrix so far is recorded."""

    async def advance(self, log_index: int, event_id: EventID | None) -> None:
        """Record the log as bridged up to ``log_index`` (``event_id``: what it became)."""

    def is_native(self, member_id: int) -> bool: ...  # a member with a ghost

    async def ghost(self, member_id: int) -> Ghost: ...  # registered and in the room

    async def ghost_intent(self, member_id: int) -> IntentAPI: ...

    # --- the queue toward Kalandra -------------------------------------------------------------

    def reserve(self, event_id: EventID) -> EventSlot: ...

    def submit(self, work: FromMatrix) -> EventSlot: ...

    async def profile(self, sender: UserID) -> Profile: ...

    # --- the Matrix room and the portal's life -----------------------------------------------

    async def ensure_matrix_room(self, invite: list[UserID]) -> RoomID: ...

    async def let_in(self, user: UserID, *, with_history: bool) -> None: ...

    async def set_relay(self, enabled: bool, mxid: UserID | None) -> None: ...

    async def unbridge(self) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def queue_depths(self) -> tuple[int, int]: ...  # waiting toward Matrix, toward Kalandra


class PortalDirectory(Protocol):
    """The bridge's portals (one directory per bridge process)."""

    def get(self, room_id: bytes) -> PortalFace | None: ...

    def by_mxid(self, mxid: RoomID) -> PortalFace | None: ...

    def all(self) -> Sequence[PortalFace]: ...

    def forget(self, portal: PortalFace) -> None: ...

    async def load_all(self) -> Sequence[PortalFace]: ...

    async def get_or_create(
        self, room_id: bytes, *, name: str, topic: str, last_log_index: int
    ) -> PortalFace: ...

    async def open(self, room_id: bytes) -> PortalFace:
        """The portal of a room the bot is in, made if needed."""

    async def bridge_existing(
        self, room_id: bytes, mxid: RoomID, *, name: str, topic: str, last_log_index: int
    ) -> PortalFace:
        """Make an existing Matrix room the portal of a room the bot is in."""


class GhostEncryption(Protocol):
    """Each ghost's own device (``bridge.encryption.ghost_devices``), as the bridge uses it."""

    async def start(self) -> None: ...

    async def encrypt(
        self, ghost: UserID, room_id: RoomID, event_type: EventType, content: Serializable | JSON
    ) -> EncryptedMegolmEventContent:
        """Megolm-encrypted by the ghost's own device (made now if it has none)."""

    async def discard_outbound_sessions(self, rooms: list[RoomID]) -> None: ...


class Impersonator(Protocol):
    """MSC4350: the bot's device encrypts for ghosts, each given an impersonatable device."""

    async def ensure(self, ghost: UserID) -> None: ...


class BridgeContext(Protocol):
    """The bridge as its components see it."""

    e2ee_self_sign: bool  # bridge.encryption.self_sign, set by e2ee.install

    @property
    def run_state(self) -> RunState: ...  # what components keep in memory while it runs

    ghost_devices: GhostEncryption | None  # bridge.encryption.ghost_devices (e2ee.install)
    impersonation: Impersonator | None  # bridge.encryption.msc4350, if used (msc4350.setup)

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

    @property
    def portals(self) -> PortalDirectory: ...

    @property
    def bridged_users(self) -> BridgedUserDirectory: ...

    @property
    def puppets(self) -> GhostDirectory: ...

    def is_bridge_ghost(self, user_id: UserID) -> bool: ...
