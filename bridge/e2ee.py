"""End-to-bridge encryption of portals on the Matrix side (mautrix.crypto, python-olm).

mautrix's EncryptionManager holds the bot's Olm account and device (created with MSC4190,
kept in the bridge's database across restarts) and receives to-device events, device lists and
one-time-key counts in appservice transactions (MSC2409, MSC3202). This module adds what a
bridge with its own portal table needs:

- a crypto state store that knows which rooms are encrypted from the room state mautrix already
  caches (``mx_room_state``), not from mautrix's own ``portal`` table, which this bridge lacks;
- encryption of what ghosts send in encrypted portals (:func:`encrypt`);
- decryption of Matrix events in portals that always fills the event's place in the portal's
  queue exactly once (:func:`decrypt_for_portal`): decrypted, the event is handled as any other;
  without its room key, the key is requested from the sender's device and waited for, within a
  bound (``KEY_WAIT``), so a transaction is never held for long; still without it, the event
  fails visibly (status event and notice) and is recorded as failed; if the key arrives later
  (``LATE_KEY_WAIT``), the message is bridged then, once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from mautrix.crypto import StateStore
from mautrix.errors import DecryptionError, MatrixError, SessionNotFound
from mautrix.types import (
    JSON,
    DeviceLists,
    EncryptedEvent,
    EncryptedMegolmEventContent,
    EncryptionAlgorithm,
    Event,
    EventType,
    MessageEvent,
    RoomEncryptionStateEventContent,
    RoomID,
    Serializable,
    SessionID,
    TrustState,
    UserID,
)
from mautrix.util.async_db import Database

if TYPE_CHECKING:
    from mautrix.bridge.e2ee import EncryptionManager

    from .bridge import KalandraBridge
    from .portal import Portal

log = logging.getLogger("kalandra.bridge.e2ee")

KEY_WAIT = 3.0  # for a room key still on its way, before asking the sender's device for it
KEY_REQUEST_WAIT = 20.0  # for an answer to that request (the transaction waits this long)
LATE_KEY_WAIT = 600.0  # for a key that comes later still: the message is bridged then

UNDECRYPTABLE = (
    "the bridge could not decrypt it: it never received the message's room key from the"
    " sending device. The bridge asked that device for the key and will bridge the message if"
    " the key arrives."
)


class CryptoStateStore(StateStore):
    """Which rooms are encrypted, and which encrypted rooms a user shares with the bot: from the
    room state the appservice's state store keeps (one database with the crypto store)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return await self.get_encryption_info(room_id) is not None

    async def get_encryption_info(self, room_id: RoomID) -> RoomEncryptionStateEventContent | None:
        value = await self.db.fetchval(
            "SELECT encryption FROM mx_room_state WHERE room_id = $1", room_id
        )
        if not value:
            return None
        info = RoomEncryptionStateEventContent.parse_json(value)
        return info if info.algorithm else None  # mautrix's {"resync": true} placeholder

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        rows = await self.db.fetch(
            "SELECT p.room_id FROM mx_user_profile p"
            " JOIN mx_room_state s ON s.room_id = p.room_id"
            " WHERE p.user_id = $1 AND p.membership IN ('join', 'invite')"
            " AND s.encryption IS NOT NULL",
            user_id,
        )
        return [RoomID(row["room_id"]) for row in rows]


def manager(bridge: KalandraBridge) -> EncryptionManager | None:
    return bridge.matrix.e2ee


def install(bridge: KalandraBridge) -> None:
    """Our crypto state store in place of mautrix's (which reads a ``portal`` table)."""
    e2ee = manager(bridge)
    if e2ee is None:
        return
    assert e2ee.crypto_db is not None
    store = CryptoStateStore(e2ee.crypto_db)
    e2ee.state_store = store
    e2ee.crypto.state_store = store
    if e2ee.appservice_mode:
        # mautrix runs these in untracked tasks, which a stop would cut off mid-query.
        handle_device_lists = e2ee.crypto.handle_device_lists

        async def device_lists(lists: DeviceLists) -> None:
            _spawn(handle_device_lists(lists), "device-lists")

        bridge.az.device_list_handler = device_lists


async def stop() -> None:
    """Ends the crypto tasks of this module (before the database closes); none start after."""
    global _stopping
    _stopping = True
    tasks = list(_tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def encryption_event(bridge: KalandraBridge) -> RoomEncryptionStateEventContent:
    """The m.room.encryption content of new encrypted portals (rotation per config)."""
    content = RoomEncryptionStateEventContent(EncryptionAlgorithm.MEGOLM_V1)
    if bridge.config["bridge.encryption.rotation.enable_custom"]:
        content.rotation_period_ms = bridge.config["bridge.encryption.rotation.milliseconds"]
        content.rotation_period_msgs = bridge.config["bridge.encryption.rotation.messages"]
    return content


def encrypt_new_portals(bridge: KalandraBridge) -> bool:
    return manager(bridge) is not None and bool(bridge.config["bridge.encryption.default"])


async def room_is_encrypted(bridge: KalandraBridge, room_id: RoomID) -> bool:
    """From the cached room state; fetched from the homeserver if the bridge has none (a room
    the bot joined after its m.room.encryption event)."""
    state_store = bridge.az.state_store
    encrypted = await state_store.is_encrypted(room_id)
    if encrypted is None:
        await bridge.az.intent.get_state(room_id)  # caches encryption and members
        encrypted = await state_store.is_encrypted(room_id)
    return bool(encrypted)


async def set_portal_encrypted(portal: Portal, encrypted: bool) -> None:
    if portal.row.encrypted == encrypted:
        return
    portal.row.encrypted = encrypted
    await portal.bridge.db.execute(
        "UPDATE bridge_portals SET encrypted = $1 WHERE room_id = $2", encrypted, portal.room_id
    )


async def encrypt(
    bridge: KalandraBridge, room_id: RoomID, event_type: EventType, content: Serializable | JSON
) -> tuple[EventType, EncryptedMegolmEventContent]:
    """The event as it goes into ``room_id``: Megolm-encrypted by the bot's device."""
    e2ee = manager(bridge)
    if e2ee is None:
        raise RuntimeError("the portal is encrypted but bridge.encryption.allow is off")
    return await e2ee.encrypt(room_id, event_type, content)


async def discard_outbound_session(bridge: KalandraBridge, room_id: RoomID) -> bool:
    """Forget the room's outbound Megolm session: the next message starts a new one."""
    e2ee = manager(bridge)
    if e2ee is None:
        return False
    await e2ee.crypto.crypto_store.remove_outbound_group_session(room_id)
    return True


# --- decryption in portals -------------------------------------------------------------------


async def decrypt_for_portal(bridge: KalandraBridge, portal: Portal, evt: EncryptedEvent) -> None:
    """Decrypt ``evt`` and hand it on (mautrix's handler), or fail it in the portal's queue;
    see the module doc. Returns once the event's place in the queue is filled."""
    e2ee = manager(bridge)
    if e2ee is None:
        _fail(portal, evt, "encryption is not enabled on this bridge.")
        return
    # Synapse replays transactions as soon as the bridge answers its ping, before the bot's
    # device is loaded.
    await bridge.matrix_ready.wait()
    decrypted: MessageEvent | None = None
    try:
        decrypted = await e2ee.decrypt(evt, wait_session_timeout=int(KEY_WAIT))
    except SessionNotFound as exc:
        _request_key(e2ee, evt)
        if await e2ee.crypto.wait_for_session(evt.room_id, exc.session_id, KEY_REQUEST_WAIT):
            try:
                decrypted = await e2ee.decrypt(evt, wait_session_timeout=0)
            except DecryptionError as again:
                log.warning("event %s not decrypted (%s)", evt.event_id, type(again).__name__)
        if decrypted is None:
            log.warning("room key of event %s not received: waiting longer", evt.event_id)
            failed = _fail(portal, evt, UNDECRYPTABLE)
            _watch_late_key(bridge, portal, evt, exc.session_id, failed)
            return
    except DecryptionError as exc:
        log.warning("event %s not decrypted (%s)", evt.event_id, type(exc).__name__)
        _fail(portal, evt, f"the bridge could not decrypt it ({type(exc).__name__}).")
        return
    await _hand_on(bridge, portal, decrypted)


async def _hand_on(bridge: KalandraBridge, portal: Portal, decrypted: MessageEvent) -> None:
    e2ee = manager(bridge)
    assert e2ee is not None
    trust: TrustState = decrypted["mautrix"]["trust_state"]
    if trust < e2ee.min_send_trust:
        _fail(
            portal,
            decrypted,
            f"the sending device is not trusted enough by the bridge ({trust}).",
        )
        return
    await bridge.matrix.int_handle_event(cast("Event", decrypted), was_encrypted=True)


def _fail(portal: Portal, evt: MessageEvent | EncryptedEvent, text: str) -> asyncio.Future[None]:
    """The event fails in its place in the queue: status event, notice, recorded as failed."""
    from .portal_to_kalandra import FromMatrix  # (the portal modules import this one)

    return portal.submit(FromMatrix("undecryptable", evt.sender, evt.event_id, reason=text))


_requested: set[SessionID] = set()


def _request_key(e2ee: EncryptionManager, evt: EncryptedEvent) -> None:
    """Ask the sending device for the room key (once per session and process)."""
    content = evt.content
    if content.session_id in _requested:
        return
    _requested.add(content.session_id)

    async def request() -> None:
        try:
            await e2ee.crypto.request_room_key(
                evt.room_id,
                content.sender_key,
                content.session_id,
                from_devices={evt.sender: [content.device_id]},
                timeout=0,
            )
        except (TimeoutError, MatrixError, OSError) as exc:
            log.warning("room key request not sent (%s)", type(exc).__name__)

    _spawn(request(), f"key-request-{evt.event_id}")


_tasks: set[asyncio.Task[None]] = set()


_stopping = False


def _spawn(coro: Any, name: str) -> None:
    if _stopping:
        coro.close()
        return
    task = asyncio.create_task(coro, name=name)
    _tasks.add(task)
    task.add_done_callback(_done)


def _done(task: asyncio.Task[None]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed (%s)", task.get_name(), type(task.exception()).__name__)


def _watch_late_key(
    bridge: KalandraBridge,
    portal: Portal,
    evt: EncryptedEvent,
    session_id: SessionID,
    failed: asyncio.Future[None],
) -> None:
    """Bridge a message recorded as undecryptable if its key still comes (within
    ``LATE_KEY_WAIT``, while this process runs): at the end of the portal's queue, once."""

    from .portal_to_kalandra import CURRENT_SLOT

    async def watch() -> None:
        CURRENT_SLOT.set(None)  # its own place in the queue was filled by the failure
        e2ee = manager(bridge)
        assert e2ee is not None
        if not await e2ee.crypto.wait_for_session(evt.room_id, session_id, LATE_KEY_WAIT):
            return
        try:
            decrypted = await e2ee.decrypt(evt, wait_session_timeout=0)
        except DecryptionError as exc:
            log.warning("event %s not decrypted late (%s)", evt.event_id, type(exc).__name__)
            return
        await asyncio.wait([failed])
        if failed.cancelled() or failed.exception() is not None:
            return  # the failure was not recorded: the transaction is retried, and with it this
        # The failure record would make the portal skip the event: this is its one late try.
        await bridge.db.execute(
            "DELETE FROM bridge_matrix_events WHERE event_id = $1 AND failure IS NOT NULL",
            evt.event_id,
        )
        log.info("room key of event %s arrived late: bridging it now", evt.event_id)
        await _hand_on(bridge, portal, decrypted)

    _spawn(watch(), f"late-key-{evt.event_id}")
