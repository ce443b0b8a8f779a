"""The bridge's own Kalandra identity: the bot's member, device key, MLS state and client.

At the first start the bot's account is created in the embedded server's store
(``kalandrabot``), a device token is issued and a signing key generated; all three are stored
sealed in bridge_client_state, then the rooms' MLS state follows (bot_state.py).

Only an account the bridge made is ever the bot's: the signing key is recorded (a "claim")
before the account is created, and bound to it right after; an account with the bot's name
that is not bound to that key (made by an operator or anyone else) is never adopted, and the
bridge refuses to start (BotAccountTaken) rather than run under another name: native members
look the bridge up by this name, and would add the other account's holder to their rooms. The bot's
``Client`` talks to the embedded Hub through the in-process loopback connection, so the server
checks the bot like any native client. Its decrypted messages and room events (commits,
moderation, failures) are routed to the portals in log order, one ordered queue each, and each
routed item is counted for the state barrier (bot_state.py).

The bot keeps a few KeyPackages published, so native members can add it to their rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from mautrix.types import UserID
from nacl.signing import SigningKey

from kalandra_core.client import events as ev
from kalandra_core.client import window
from kalandra_core.client.bridge_invite import invited_mxid
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.extras import ExtendedCore
from kalandra_core.mls.keypackage import bundle_is_last_resort
from kalandra_core.proto import ErrorCode
from kalandra_core.storage.base import AlreadyExists
from kalandra_core.transport.loopback import loopback_connector

from . import access, permissions
from .bot_state import BotState
from .db import ClientStateTable, SealedIdentity
from .portal import admission
from .portal.backfill import BackfillSettings, BackfillTable, HistoryBuffer
from .routed import Item, RosterCheck

if TYPE_CHECKING:
    from kalandra_core.server.app import RunningServer

    from .context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.bot")

BOT_MEMBER_NAME = "kalandrabot"
OWNER = "bot"
_EMBEDDED = ServerAddress("tcp", "embedded", 1)  # ignored by the loopback connector
KEY_PACKAGES = 5  # kept published (each native room that adds the bot takes one)
# Room events that belong in a portal's queue, in log order with its messages.
_ROUTED = (
    ev.EpochChanged,
    ev.Moderated,
    ev.Left,
    ev.Undecryptable,
    ev.Reacted,
    ev.Receipted,
    ev.Typing,
    ev.RoomMetaChanged,
)


# Refusals of a request that names something that is not there (a member, a message): the
# command that asked answers them; nothing for the operator to do.
_USERS_MISTAKES = frozenset(
    {
        ErrorCode.MEMBER_NOT_FOUND,
        ErrorCode.MESSAGE_NOT_FOUND,
        ErrorCode.ROOM_NOT_FOUND,
        ErrorCode.ALREADY_EXISTS,
    }
)


class BotIdentityLost(RuntimeError):
    pass


class BotAccountTaken(BotIdentityLost):
    pass


class _MessageRouter(asyncio.Queue[ev.Message]):
    """Stands in for ``Client.messages``: each message goes straight to its portal's queue,
    counted for the state barrier (see bot_state.py) before the client saves its state."""

    def __init__(self, bot: KalandraBot) -> None:
        super().__init__()
        self._bot = bot

    def put_nowait(self, item: ev.Message) -> None:
        self._bot.route(item)


class _EventRouter(asyncio.Queue[ev.Event]):
    """Stands in for ``Client.events``: room events of portal rooms go to the portal's queue
    like messages (the client puts them here synchronously, in log order); the rest stays
    here for the bot's own watcher."""

    def __init__(self, bot: KalandraBot) -> None:
        super().__init__()
        self._bot = bot

    def put_nowait(self, item: ev.Event) -> None:
        if isinstance(item, ev.CaughtUp):
            self._bot.caught_up(item.room_id)
        elif isinstance(item, _ROUTED) and self._bot.bridge.portals.get(item.room_id) is not None:
            self._bot.route(item)
        elif isinstance(item, (ev.Moderated, ev.Left)) and self._bot.history is not None:
            self._bot.route(item)  # a redaction or a leave changes the kept history
        else:
            super().put_nowait(item)


class KalandraBot:
    def __init__(self, bridge: BridgeContext, server: RunningServer) -> None:
        self.bridge = bridge
        self.server = server
        key = bridge.config.mls_state_key
        assert key is not None  # checked with the config
        self.state = BotState(ClientStateTable(bridge.db, key, OWNER))
        # What rooms without a portal say, kept for their future portal (portal/backfill.py).
        self.history: HistoryBuffer | None = None
        if BackfillSettings.of(bridge).enabled:
            self.history = HistoryBuffer(bridge, self.state)
        self.client: Client | None = None
        self._events: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # One commit of the bot's at a time (its group has room for one pending commit).
        self.commit_lock = asyncio.Lock()
        self._invite_lock = asyncio.Lock()
        # Portals whose roster is checked once their room is caught up after the start.
        self._roster_due: set[bytes] = set()
        self._connected_at = 0.0

    @property
    def member_id(self) -> int:
        assert self.client is not None
        return self.client.core.member_id

    @property
    def core(self) -> ClientCore:
        assert self.client is not None
        return self.client.core

    async def _identity(self) -> SealedIdentity:
        table = self.state.table
        identity = await table.load_identity()
        if identity is not None:
            return identity
        store = self.server.store
        # The key of an account we started making (a start interrupted before it was saved).
        key = await table.load_claim()
        account = await store.find_member(BOT_MEMBER_NAME)
        if account is None:
            if key is None:
                key = bytes(SigningKey.generate())
                await table.save_claim(key)  # recorded before the account exists
            try:
                account = await store.create_member(BOT_MEMBER_NAME)
            except AlreadyExists:  # made by someone else meanwhile
                account = await store.find_member(BOT_MEMBER_NAME)
                assert account is not None
                raise _taken(account.member_id) from None
            await store.set_signature_key(account.member_id, _public(key))
            log.info("created the bot's Kalandra account, member %d", account.member_id)
        elif key is None or account.signature_key != _public(key):
            if key is None and account.signature_key is not None:
                # Its device key was bound at a first login, and the sealed copy is gone.
                raise BotIdentityLost(
                    f"the Kalandra account {BOT_MEMBER_NAME!r} exists with a device key, but"
                    " the bridge database has no identity for it (restored without it?)"
                )
            raise _taken(account.member_id)
        token = await store.issue_token(account.member_id)
        identity = SealedIdentity(account.member_id, token, key)
        await table.save_identity(identity)
        await table.drop_claim()
        return identity

    async def start(self) -> None:
        identity = await self._identity()
        # Native clients learn who the bridge is from the server (`kalandra invite ROOM bridge`).
        await self.server.hub.announce_bridge_bot(identity.member_id, str(self.bridge.az.bot_mxid))
        core = ExtendedCore(identity.member_id, identity.signing_key)  # + reactions, typing
        await self.state.table.load_into(core)
        self.state.start()
        if self.history is not None:
            self.history.start()
        else:  # kept while it was on: not kept any longer
            key = self.bridge.config.mls_state_key
            assert key is not None
            await BackfillTable(self.bridge.db, key).clear()
        await self.bridge.bridged_users.load_member_ids()
        await access.load(self.bridge)
        self.bridge.run_state.log_heads = await self.server.store.log_heads()
        # The puppet leaves never commit themselves.
        core.commit_for = self.bridge.bridged_users.member_ids
        for portal in await self.bridge.portals.load_all():
            portal.start()
            self._roster_due.add(portal.room_id)
        limits = self.server.hub.config.limits
        client = Client(
            core,
            _EMBEDDED,
            identity.token,
            state=self.state,  # type: ignore[arg-type]  # ClientState's save, save_all, durable
            # The bot's media transfers may fill its whole send window with blocks the server
            # answers (DEFAULT_BYTES): on top of the usual slow-reader headroom for the rooms'
            # traffic, not out of it.
            connector=loopback_connector(
                self.server.hub.session_factory,
                max_buffered=limits.send_buffer + window.DEFAULT_BYTES,
            ),
            keepalive=max(1.0, min(30.0, limits.idle_timeout / 3)),
        )
        client.messages = _MessageRouter(self)
        client.events = _EventRouter(self)
        self.client = client
        self._events = asyncio.create_task(self._watch_events(client), name="bot-events")
        self._connected_at = time.monotonic()
        await client.connect()
        log.info("the bot is connected as member %d (%d rooms)", core.member_id, len(core.rooms))
        self._spawn(self._after_catch_up(client), "bot-catch-up")
        self._spawn(self._enforce_access_rules(), "bot-access-rules")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_catch_up(self, client: Client) -> None:
        """KeyPackages topped up; once the rooms are caught up from the saved state, users
        demoted while the bridge was down lose their memberships (on the caught-up groups: a
        commit on an older epoch would be refused). Each portal's Matrix membership and epoch
        state are checked against its group as soon as its own room is caught up
        (:meth:`caught_up`): the catch-up of a thousand rooms runs behind any new work, and
        a portal does not wait for the others."""
        await self._key_packages()
        await client.caught_up()
        for room_id in list(self._roster_due):  # a sync the server refused: the state so far
            self._roster_check_due(room_id)
        await permissions.remove_unpermitted(self.bridge)

    def caught_up(self, room_id: bytes) -> None:
        """The room has applied the log since the connection (its items routed already)."""
        self._roster_check_due(room_id)
        if not self.core.catching_up:
            log.info(
                "the bot's rooms are caught up, %.1f s after connecting",
                time.monotonic() - self._connected_at,
            )

    def _roster_check_due(self, room_id: bytes) -> None:
        if room_id in self._roster_due:
            self._roster_due.discard(room_id)
            portal = self.bridge.portals.get(room_id)
            if portal is not None:
                self.check_roster(portal)

    def check_roster(self, portal: PortalFace) -> None:
        """Queue a check of the portal's ghosts and epoch state against the group as it is
        now (behind everything routed so far, so the queue is consistent with it)."""
        room = self.core.rooms.get(portal.room_id)
        if room is not None and room.active and room.anchored:
            self.route(RosterCheck.of(room))

    async def _key_packages(self) -> None:
        assert self.client is not None
        try:
            have = await self.server.store.key_package_count(self.member_id)
            # The client adds a last-resort KeyPackage when it has none: however many were
            # fetched, the bot can always be added.
            last_resort = any(bundle_is_last_resort(b) for b in self.core.bundles.values())
            if have < KEY_PACKAGES or not last_resort:
                await self.client.publish_key_packages(max(0, KEY_PACKAGES - have))
        except Exception as exc:  # retried at the next join or start
            log.warning("publishing the bot's KeyPackages failed (%s)", type(exc).__name__)

    def route(self, item: Item) -> None:
        self.state.message_routed(item.room_id)
        portal = self.bridge.portals.get(item.room_id)
        invited = invited_mxid(item.content) if isinstance(item, ev.Message) else None
        if portal is None and invited is not None:
            # A native member lets a Matrix user in (access.py), in a room without a portal:
            # counted done once the grant is recorded.
            assert isinstance(item, ev.Message)
            self._spawn(self._invited(item, UserID(invited)), "bot-bridge-invite")
        elif portal is None and self.history is not None and isinstance(item, ev.Event):
            self.history.put(item)  # counted done once kept
        elif portal is None:
            self.state.message_done(item.room_id)  # no portal: nothing to bridge
        else:
            portal.enqueue(item)

    async def _invited(self, message: ev.Message, mxid: UserID) -> None:
        async with self._invite_lock:  # one portal made at a time
            await admission.invited_without_portal(self.bridge, message, mxid)

    async def _enforce_access_rules(self) -> None:
        """Portals made before the access policy get its join rule and history visibility."""
        await self.bridge.matrix_ready.wait()
        for portal in self.bridge.portals.all():
            if portal.mxid is not None:
                await access.enforce_room_rules(self.bridge, portal.mxid)

    async def _watch_events(self, client: Client) -> None:
        while True:
            event = await client.events.get()
            if isinstance(event, ev.Failed):
                # A refusal about what a user named (a typo in a command) is answered to them;
                # the rest may need the operator.
                level = logging.INFO if event.code in _USERS_MISTAKES else logging.WARNING
                log.log(
                    level,
                    "bot request failed in room %s: code %d",
                    event.room_id.hex(),
                    event.code,
                )
            elif isinstance(event, ev.Undecryptable):
                log.warning(
                    "room %s: log index %d undecryptable", event.room_id.hex(), event.log_index
                )
            elif isinstance(event, ev.Joined):
                log.info("the bot joined Kalandra room %s", event.room_id.hex())
                self._spawn(self._key_packages(), "bot-key-packages")

    async def stop(self) -> None:
        if self._events is not None:
            self._events.cancel()
        for task in list(self._tasks):
            task.cancel()
        for portal in self.bridge.portals.all():
            await portal.stop()
        await self.bridge.bridged_users.close_all()
        if self.history is not None:
            self.history.stop()
        if self.client is not None:
            await self.client.close()
        with contextlib.suppress(TimeoutError):
            await self.state.stop()


def _public(signing_key: bytes) -> bytes:
    return bytes(SigningKey(signing_key).verify_key)


def _taken(member_id: int) -> BotAccountTaken:
    return BotAccountTaken(
        f"the Kalandra account {BOT_MEMBER_NAME!r} (member {member_id}) is not one this bridge"
        " made and bound its key to, so it is not adopted as the bot: whoever made it may hold"
        " its device tokens,"
        " and native members who add the bridge by that name would let them into their rooms."
        " The bridge does not start under another name either. Delete that account (`DELETE"
        f" FROM members WHERE name = '{BOT_MEMBER_NAME}'` in the database, after checking who"
        " made it and why), then start the bridge again: it makes its own."
    )
