"""End-to-bridge encryption of portals on the Matrix side (mautrix.crypto, python-olm).

mautrix's EncryptionManager holds the bot's Olm account and device (created with MSC4190,
kept in the bridge's database across restarts) and receives to-device events, device lists and
one-time-key counts in appservice transactions (MSC2409, MSC3202). This module adds what a
bridge with its own portal table needs:

- a crypto state store that knows which rooms are encrypted from the room state mautrix already
  caches (``mx_room_state``), not from mautrix's own ``portal`` table, which this bridge lacks;
- encryption of what ghosts send in encrypted portals (:func:`encrypt`), by each ghost's own
  device (ghost_devices.py, ``bridge.encryption.ghost_devices``) or else by the bot's;
- decryption of Matrix events in portals that always fills the event's place in the portal's
  queue exactly once (:func:`decrypt_for_portal`), and bridges late what could only be
  decrypted late (:func:`_request_key`).

Why an event without its room key is failed at once rather than waited for: Synapse sends an
appservice one transaction at a time, so a key that was not in this transaction or an earlier
one can only come in a later one, which waits for this one's answer; and while Synapse
recovers from an outage of the appservice it replays stored transactions without their
to-device events and drops new transactions that hold no room events, so a room key sent to the
bot's device then is lost for good. The bridge therefore asks the sending device for the key
(again, with backoff, since an answer can be dropped the same way), answers the transaction
with a status event and a notice, and bridges the message once if the key comes
(``LATE_KEY_WAIT``), in the order of the portal's events; its failure reports are then
withdrawn (portal/statuses.py). The wait outlives a restart: an event failed this way is recorded
so in the database, and at start-up the bridge fetches it again from its room and resumes
asking for its key (:func:`resume_key_waits`, for events failed within ``KEPT_WAITS``).

A relation to such an event (a reaction, which clients send in clear even in encrypted rooms;
a redaction) would find no bridged message to point at: it is held instead (:func:`hold`,
recorded as ``HELD`` so it is held again after a restart) and handed to its portal's queue
again right after its target (:func:`_release`), at the queue's end: nothing waits for it. If
the key never comes, the relation then fails visibly (portal/relations.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mautrix.crypto import OlmMachine, StateStore
from mautrix.errors import (
    DecryptionError,
    EncryptionError,
    MatrixError,
    MatrixRequestError,
    SessionNotFound,
)
from mautrix.types import (
    JSON,
    DeviceID,
    DeviceLists,
    EncryptedEvent,
    EncryptedMegolmEventContent,
    EncryptionAlgorithm,
    Event,
    EventID,
    EventType,
    MessageEvent,
    MessageStatusReason,
    RoomEncryptionStateEventContent,
    RoomID,
    Serializable,
    SessionID,
    TrustState,
    UserID,
)
from mautrix.util.async_db import Database

from kalandra_core.private_files import open_new_private
from kalandra_core.storage.reachable import through_outage

from .. import metrics
from ..portal_work import CURRENT_SLOT, EventSlot, FromMatrix
from ..run_state import Late, LateEvent
from . import ghost_devices
from .ghost_devices import GhostDevices

if TYPE_CHECKING:
    from mautrix.bridge.e2ee import EncryptionManager

    from ..context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.e2ee")

KEY_WAIT = 1  # for a room key being stored (mautrix handles to-device events first)
# For a key that comes after the event failed: it is bridged then (tests only: shorter with
# KALANDRA_TEST_LATE_KEY_WAIT, in seconds, to see a wait give up).
LATE_KEY_WAIT = float(os.environ.get("KALANDRA_TEST_LATE_KEY_WAIT", "") or 600.0)
REFRESH_WAIT = 10.0  # at most, for the device lists at startup before encrypting
KEY_REQUEST_RETRIES = (5.0, 15.0, 45.0, 120.0, 300.0)  # seconds before asking again
KEY_POLL = 1.0  # seconds between looks at the store while a key is waited for
KEPT_WAITS = 86400.0  # seconds after its failure a key is still waited for at start-up
# Tests only: seconds resume_key_waits takes before it registers the waits (widens the window in
# which Matrix events are handled before them; see relations_resumed).
_RESUME_LAG = float(os.environ.get("KALANDRA_TEST_RESUME_LAG", "0") or 0)
HELD = "com.kalandra.awaiting_target"  # the record of a relation held for its target (hold)

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


def manager(bridge: BridgeContext) -> EncryptionManager | None:
    return bridge.matrix.e2ee


def install(bridge: BridgeContext) -> None:
    """Our crypto state store in place of mautrix's (which reads a ``portal`` table)."""
    e2ee = manager(bridge)
    if e2ee is None:
        return
    assert e2ee.crypto_db is not None
    # mautrix would log the recovery key of the bot's new cross-signing keys: we do that step
    # ourselves after its start (self_sign below), with the key in a file, not in the log.
    bridge.e2ee_self_sign = e2ee.self_sign
    e2ee.self_sign = False
    _encrypt_bot_sends(bridge)
    store = CryptoStateStore(e2ee.crypto_db)
    e2ee.state_store = store
    e2ee.crypto.state_store = store
    if e2ee.appservice_mode:
        # mautrix runs these in untracked tasks, which a stop would cut off mid-query.
        handle_device_lists = e2ee.crypto.handle_device_lists

        async def device_lists(lists: DeviceLists) -> None:
            _spawn(bridge, handle_device_lists(lists), "device-lists")

        bridge.az.device_list_handler = device_lists
        if bridge.config["bridge.encryption.ghost_devices"] and e2ee.msc4190:
            # Ghosts' devices are made with MSC4190 and get their to-device events in
            # transactions (routed first, then waited through database outages like the bot's).
            devices = GhostDevices(e2ee, e2ee.crypto_db)
            ghost_devices.install(e2ee, devices)
            bridge.ghost_devices = devices
        if bridge.az.to_device_handler is not None:
            bridge.az.to_device_handler = _outage_waited(bridge.az.to_device_handler)
    if bridge.config["bridge.encryption.ghost_devices"] and bridge.ghost_devices is None:
        log.warning(
            "bridge.encryption.ghost_devices needs bridge.encryption.appservice and msc4190:"
            " the bot's device encrypts for the ghosts"
        )


def _outage_waited(handle: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[None]]:
    """A to-device event (a room key) met with the crypto store's database down is handled
    again once it is back, however long that takes. mautrix logs the failure and goes on, and
    Synapse never sends a to-device event twice (its retries of a transaction carry the room
    events only): the key would be lost, and its messages bridged only through a key request,
    late and out of order (seen in the soak: 94 such messages in 10 minutes with 4 PostgreSQL
    restarts). The transaction waits meanwhile; all the bridge does needs the database too."""

    async def handled(evt: Any) -> None:
        await through_outage(functools.partial(handle, evt), "a to-device event", log)

    return handled


def _encrypt_bot_sends(bridge: BridgeContext) -> None:
    """What the bot itself sends into an encrypted room (command replies, its welcome, refusals,
    mautrix's notices) goes encrypted: mautrix encrypts only what its own portal class sends.
    The bot's intent exists once the appservice starts, so it is wrapped then."""
    az = bridge.az
    start = az.start

    async def start_and_wrap(*args: Any, **kwargs: Any) -> None:
        await start(*args, **kwargs)
        intent = az.intent
        send = intent.send_message_event

        async def send_message_event(
            room_id: RoomID, event_type: EventType, content: Any, **kw: Any
        ) -> EventID:
            if event_type != EventType.ROOM_ENCRYPTED and await _bot_room_encrypted(
                bridge, room_id
            ):
                event_type, content = await encrypt(bridge, room_id, event_type, content)
            return await send(room_id, event_type, content, **kw)

        setattr(intent, "send_message_event", send_message_event)  # noqa: B010 (mypy)

    setattr(az, "start", start_and_wrap)  # noqa: B010 (mypy: assigning to a method)


async def _bot_room_encrypted(bridge: BridgeContext, room_id: RoomID) -> bool:
    if await bridge.az.state_store.is_encrypted(room_id):
        return True
    if room_id in bridge.run_state.e2ee.seen_clear:
        return False
    encrypted = await room_is_encrypted(bridge, room_id)  # a failure fails the send
    if not encrypted:
        bridge.run_state.e2ee.seen_clear.add(room_id)
    return encrypted


def refresh_device_lists(bridge: BridgeContext) -> None:
    """Query again the devices of the users in encrypted portals. Device list changes come in
    transactions (MSC3202), and those Synapse sends while it recovers from an outage of the
    appservice lack them: without this, a device added meanwhile would not get the bridge's
    room keys (and could not read what the bridge sends)."""
    e2ee = manager(bridge)
    if e2ee is None or e2ee.crypto_db is None:
        return
    db, crypto = e2ee.crypto_db, e2ee.crypto
    refreshed = bridge.run_state.e2ee.refreshed = asyncio.Event()

    async def refresh() -> None:
        try:
            await query()
        finally:
            refreshed.set()

    async def query() -> None:
        rows = await db.fetch(
            "SELECT DISTINCT p.user_id FROM mx_user_profile p"
            " JOIN mx_room_state s ON s.room_id = p.room_id"
            " WHERE p.membership IN ('join', 'invite') AND s.encryption IS NOT NULL"
        )
        users = [UserID(row["user_id"]) for row in rows]
        users = [u for u in users if u != bridge.az.bot_mxid and not bridge.is_bridge_ghost(u)]
        if users:  # (only those mautrix tracks: whose devices it knew)
            await crypto.handle_device_lists(DeviceLists(changed=users, left=[]))

    _spawn(bridge, refresh(), "refresh-device-lists")


async def stop(bridge: BridgeContext) -> None:
    """Ends the crypto tasks of this module (before the database closes); none start after."""
    state = bridge.run_state.e2ee
    state.stopping = True
    tasks = list(state.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def encryption_event(bridge: BridgeContext) -> RoomEncryptionStateEventContent:
    """The m.room.encryption content of new encrypted portals (rotation per config)."""
    content = RoomEncryptionStateEventContent(EncryptionAlgorithm.MEGOLM_V1)
    if bridge.config["bridge.encryption.rotation.enable_custom"]:
        content.rotation_period_ms = bridge.config["bridge.encryption.rotation.milliseconds"]
        content.rotation_period_msgs = bridge.config["bridge.encryption.rotation.messages"]
    return content


def encrypt_new_portals(bridge: BridgeContext) -> bool:
    # With ``require``, a new portal that was not encrypted could carry no message at all.
    required = bool(bridge.config["bridge.encryption.require"])
    return manager(bridge) is not None and (
        bool(bridge.config["bridge.encryption.default"]) or required
    )


async def room_is_encrypted(bridge: BridgeContext, room_id: RoomID) -> bool:
    """From the cached room state; fetched from the homeserver if the bridge has none (a room
    the bot joined after its m.room.encryption event)."""
    state_store = bridge.az.state_store
    encrypted = await state_store.is_encrypted(room_id)
    if encrypted is None:
        await bridge.az.intent.get_state(room_id)  # caches encryption and members
        encrypted = await state_store.is_encrypted(room_id)
    return bool(encrypted)


async def set_portal_encrypted(portal: PortalFace, encrypted: bool) -> None:
    if portal.row.encrypted == encrypted:
        return
    portal.row.encrypted = encrypted
    await portal.bridge.db.execute(
        "UPDATE bridge_portals SET encrypted = $1 WHERE room_id = $2", encrypted, portal.room_id
    )


async def encrypt(
    bridge: BridgeContext,
    room_id: RoomID,
    event_type: EventType,
    content: Serializable | JSON,
    sender: UserID | None = None,
) -> tuple[EventType, EncryptedMegolmEventContent]:
    """The event as it goes into ``room_id``: Megolm-encrypted by the bot's device that
    ``sender`` (a ghost) names as its impersonator (MSC4350, msc4350.py), else by the ghost's
    own device with ``bridge.encryption.ghost_devices``, else by the bot's device."""
    e2ee = manager(bridge)
    if e2ee is None:
        raise RuntimeError("the portal is encrypted but bridge.encryption.allow is off")
    refreshed = bridge.run_state.e2ee.refreshed
    if refreshed is not None and not refreshed.is_set():
        # Keys go to the devices the bridge knows: first learn those added while it was down.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(refreshed.wait(), REFRESH_WAIT)
    started = time.perf_counter()
    if sender is not None and bridge.impersonation is not None:
        try:
            await bridge.impersonation.ensure(sender)
        except MatrixRequestError as exc:
            # Refused by the homeserver: the bot's device encrypts all the same, as without
            # MSC4350 (a mismatched sender in clients); the ghost's next message tries again.
            log.warning(
                "ghost %s: no impersonatable device (%s): encrypted without",
                sender,
                type(exc).__name__,
            )
        result = await e2ee.encrypt(room_id, event_type, content)
        metrics.ENCRYPT.labels("msc4350").observe(time.perf_counter() - started)
        return result
    if sender is not None and bridge.ghost_devices is not None:
        try:
            encrypted = await bridge.ghost_devices.encrypt(sender, room_id, event_type, content)
        except (MatrixRequestError, EncryptionError) as exc:
            # Refused by the homeserver (e.g. the ghost's device deleted there), not unreachable
            # (that is retried like any send): the message goes out from the bot's device,
            # with the mismatched-sender shield, rather than not at all.
            log.warning(
                "ghost %s: its own device failed (%s): the bot's device encrypts instead",
                sender,
                type(exc).__name__,
            )
        else:
            metrics.ENCRYPT.labels("ghost").observe(time.perf_counter() - started)
            return EventType.ROOM_ENCRYPTED, encrypted
    result = await e2ee.encrypt(room_id, event_type, content)
    metrics.ENCRYPT.labels("bot").observe(time.perf_counter() - started)
    return result


async def discard_outbound_session(bridge: BridgeContext, room_id: RoomID) -> bool:
    """Forget the room's outbound Megolm session: the next message starts a new one."""
    e2ee = manager(bridge)
    if e2ee is None:
        return False
    await e2ee.crypto.crypto_store.remove_outbound_group_session(room_id)
    if bridge.ghost_devices is not None:
        await bridge.ghost_devices.discard_outbound_sessions([room_id])
    return True


# --- decryption in portals -------------------------------------------------------------------


async def decrypt_for_portal(
    bridge: BridgeContext, portal: PortalFace, evt: EncryptedEvent
) -> None:
    """Decrypt ``evt`` and hand it on (mautrix's handler), or fail it in the portal's queue;
    see the module doc. Returns once the event's place in the queue is filled."""
    e2ee = manager(bridge)
    if e2ee is None:
        _fail(portal, evt, "encryption is not enabled on this bridge.")
        return
    # Synapse replays transactions as soon as the bridge answers its ping, before the bot's
    # device is loaded.
    await bridge.matrix_ready.wait()
    session_id = evt.content.session_id
    try:
        # A session already asked for will not come within this transaction.
        wait = 0 if session_id in bridge.run_state.e2ee.requested else KEY_WAIT
        decrypted = await e2ee.decrypt(evt, wait_session_timeout=wait)
    except SessionNotFound:
        log.warning("room key of event %s not received: asking the sender for it", evt.event_id)
        slot = _fail(portal, evt, UNDECRYPTABLE)
        state = bridge.run_state.e2ee
        _wait_late(state.late.setdefault(evt.room_id, {}), evt, slot.done, slot.place)
        if session_id not in state.requested:
            state.requested.add(session_id)
            _spawn(bridge, _request_key(bridge, evt), f"key-request-{evt.event_id}")
        return
    except DecryptionError as exc:
        log.warning("event %s not decrypted (%s)", evt.event_id, type(exc).__name__)
        _fail(portal, evt, f"the bridge could not decrypt it ({type(exc).__name__}).")
        return
    await _hand_on(bridge, portal, decrypted)


async def _hand_on(bridge: BridgeContext, portal: PortalFace, decrypted: MessageEvent) -> None:
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


def _fail(portal: PortalFace, evt: MessageEvent | EncryptedEvent, text: str) -> EventSlot:
    """The event fails in its place in the queue: status event, notice, recorded as failed."""
    return portal.submit(FromMatrix("undecryptable", evt.sender, evt.event_id, reason=text))


def _wait_late(late: Late, evt: EncryptedEvent, failed: asyncio.Future[None], place: int) -> None:
    """``evt`` waits for its room key, to be bridged in its place among the room's late events:
    the place of its first failure (a replay of its transaction fails it again, later in the
    queue). Its handlers ran concurrently (mautrix's), so their order of arrival here says
    nothing; the queue's places do."""
    known = late.get(evt.event_id)
    if known is not None and not _unrecorded(known.failed):
        return
    late[evt.event_id] = LateEvent(evt, failed, place if known is None else known.place)


def _unrecorded(failed: asyncio.Future[None]) -> bool:
    """The failure was not recorded (its transaction is retried)."""
    return failed.done() and (failed.cancelled() or failed.exception() is not None)


async def _request_key(bridge: BridgeContext, evt: EncryptedEvent) -> None:
    """Ask the sending device for the event's room key until it comes (or ``LATE_KEY_WAIT``
    is over), then bridge what it unlocks."""
    e2ee = manager(bridge)
    assert e2ee is not None
    content = evt.content
    # Without the (deprecated) device id, every device of the sender is asked.
    devices = [content.device_id] if content.device_id else [DeviceID("*")]
    deadline = asyncio.get_running_loop().time() + LATE_KEY_WAIT
    for pause in (*KEY_REQUEST_RETRIES, LATE_KEY_WAIT):
        if await e2ee.crypto.crypto_store.has_group_session(evt.room_id, content.session_id):
            break
        try:
            await e2ee.crypto.request_room_key(
                evt.room_id,
                content.sender_key,
                content.session_id,
                from_devices={evt.sender: list(devices)},
                timeout=0,
            )
        except (TimeoutError, MatrixError, OSError) as exc:
            log.warning("room key request not sent (%s)", type(exc).__name__)
        pause = min(pause, deadline - asyncio.get_running_loop().time())
        if pause <= 0:
            break
        if await _wait_for_session(e2ee.crypto, evt.room_id, content.session_id, pause):
            break
    bridge.run_state.e2ee.requested.discard(content.session_id)  # a later event may ask again
    if await e2ee.crypto.crypto_store.has_group_session(evt.room_id, content.session_id):
        await _bridge_late(bridge, evt.room_id)
    else:
        _drop_late(bridge, evt.room_id, content.session_id)


async def _wait_for_session(
    crypto: OlmMachine, room_id: RoomID, session_id: SessionID, within: float
) -> bool:
    """Whether the session's key came ``within`` seconds. mautrix wakes a waiter only if it is
    waiting when the key is stored: a key stored while the request was being sent would go
    unseen until the end of a long pause, so the store is looked at every ``KEY_POLL`` too."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while (left := end - loop.time()) > 0:
        if await crypto.wait_for_session(room_id, session_id, min(left, KEY_POLL)):
            return True
    return False


def _drop_late(bridge: BridgeContext, room_id: RoomID, session_id: SessionID) -> None:
    """The key wait for ``session_id`` is over: its relations held fail (see _release)."""
    late = bridge.run_state.e2ee.late.get(room_id, {})
    for event_id in [e for e, w in late.items() if w.event.content.session_id == session_id]:
        del late[event_id]
        _release(bridge, room_id, event_id)


_RELEASED_KEPT = 1000  # targets released lately, remembered


async def hold(portal: PortalFace, target: EventID, work: FromMatrix) -> bool:
    """Hold ``work`` (a relation to ``target`` in ``portal``) if ``target`` waits for its room
    key; False if it does not. Only once the waits of before a restart are resumed: until
    then a target still waited for is not known as such (a transaction replayed at start-up
    comes before). No await between the check and the hold: a target cannot be released in
    between. A target released while ``work`` was looking it up is in the queue already:
    ``work`` goes again after it (once)."""
    state = portal.bridge.run_state.e2ee
    await state.resumed.wait()
    if target in state.released and not work.held:
        _requeue(portal, [work])
        return True
    if target not in state.late.get(portal.room_mxid, {}):
        return False
    held = state.held.setdefault(target, [])
    if all(w.event_id != work.event_id for w in held):  # (a transaction replayed)
        held.append(work)
    return True


def _release(bridge: BridgeContext, room_id: RoomID, target: EventID) -> None:
    """Hand the relations held for ``target`` to its portal's queue again, at its end: after
    the target when it was just handed on, else (its key never came) they fail there."""
    state = bridge.run_state.e2ee
    state.released[target] = None
    while len(state.released) > _RELEASED_KEPT:
        del state.released[next(iter(state.released))]
    portal = bridge.portals.by_mxid(room_id)
    works = state.held.pop(target, [])
    if portal is not None:
        _requeue(portal, works)


def _requeue(portal: PortalFace, works: list[FromMatrix]) -> None:
    import dataclasses

    for work in works:
        portal.submit(dataclasses.replace(work, held=True))


async def _bridge_late(bridge: BridgeContext, room_id: RoomID) -> None:
    """Bridge, in queue order, the portal's failed events whose room keys are now here: each
    at the end of the portal's queue, once."""
    CURRENT_SLOT.set(None)  # their own places in the queue were filled by the failures
    e2ee = manager(bridge)
    assert e2ee is not None
    state = bridge.run_state.e2ee
    async with state.late_locks.setdefault(room_id, asyncio.Lock()):
        late = state.late.get(room_id, {})
        for event_id, waiting in sorted(late.items(), key=lambda item: item[1].place):
            evt, failed = waiting.event, waiting.failed
            store = e2ee.crypto.crypto_store
            if not await store.has_group_session(room_id, evt.content.session_id):
                continue
            try:
                await _bridge_one_late(bridge, evt, failed)
            finally:
                # Waited for until handed on, so that a relation to it is held meanwhile.
                late.pop(event_id, None)
                _release(bridge, room_id, event_id)  # its relations held: after it, or fail


async def _bridge_one_late(
    bridge: BridgeContext, evt: EncryptedEvent, failed: asyncio.Future[None]
) -> None:

    e2ee = manager(bridge)
    assert e2ee is not None
    event_id = evt.event_id
    await asyncio.wait([failed])
    if failed.cancelled() or failed.exception() is not None:
        return  # the failure was not recorded: the transaction is retried, and this
    try:
        decrypted = await e2ee.decrypt(evt, wait_session_timeout=0)
    except DecryptionError as exc:
        log.warning("event %s not decrypted late (%s)", event_id, type(exc).__name__)
        return
    portal = bridge.portals.by_mxid(evt.room_id)
    if portal is None:
        return  # unbridged meanwhile
    # The failure record would make the portal skip the event: this is its one late try.
    await bridge.db.execute(
        "DELETE FROM bridge_matrix_events WHERE event_id = $1 AND failure IS NOT NULL",
        event_id,
    )
    log.info("room key of event %s arrived late: bridging it now", event_id)
    portal.mx_status.late.add(event_id)  # its failure reports are withdrawn
    await _hand_on(bridge, portal, decrypted)


async def resume_key_waits(bridge: BridgeContext) -> None:
    """At start-up: the events of encrypted portals that failed for a missing room key
    (recorded so, within ``KEPT_WAITS``) are waited for again, oldest first (see the module)."""
    from ..db.util import now_ms

    e2ee = manager(bridge)
    if e2ee is None:
        return
    rows = await bridge.db.fetch(
        "SELECT event_id, failure FROM bridge_matrix_events WHERE failure IN ($1, $2)"
        " AND processed_at > $3 ORDER BY processed_at LIMIT 500",
        MessageStatusReason.UNDECRYPTABLE.value,
        HELD,
        now_ms() - int(KEPT_WAITS * 1000),
    )
    if not rows:
        return
    if _RESUME_LAG:  # tests only
        await asyncio.sleep(_RESUME_LAG)
    rooms = [
        portal.row.mxid
        for portal in bridge.portals.all()
        if portal.row.mxid is not None and await room_is_encrypted(bridge, portal.row.mxid)
    ]
    resumed = 0
    held: list[Event] = []
    # Before any place of the new process's queues (those start at 1), oldest first.
    for place, row in enumerate(rows, start=-len(rows)):
        found = await _fetch(bridge, rooms, EventID(row["event_id"]))
        if row["failure"] == HELD:
            if found is not None:
                held.append(found)
            continue
        evt = found if isinstance(found, EncryptedEvent) else None
        if evt is None:
            continue  # not a missing key (another failure), or its room is gone
        failed = asyncio.get_running_loop().create_future()
        failed.set_result(None)  # recorded before the restart
        state = bridge.run_state.e2ee
        _wait_late(state.late.setdefault(evt.room_id, {}), evt, failed, place)
        resumed += 1
        if evt.content.session_id not in state.requested:
            state.requested.add(evt.content.session_id)
            _spawn(bridge, _request_key(bridge, evt), f"key-request-{evt.event_id}")
    log.info("waiting again for the room keys of %d failed events", resumed)
    bridge.run_state.e2ee.resumed.set()
    # The relations held for those (or for events no longer waited for: they fail now), handed
    # to their portals' queues again: held again, or failed (portal/relations.py).
    for event in held:
        await bridge.matrix.int_handle_event(event)


async def _fetch(bridge: BridgeContext, rooms: list[RoomID], event_id: EventID) -> Event | None:
    for room in rooms:
        try:
            return await bridge.az.intent.get_event(room, event_id)
        except MatrixError:
            continue  # in another portal
    return None


def _spawn(bridge: BridgeContext, coro: Any, name: str) -> None:
    state = bridge.run_state.e2ee
    if state.stopping:
        coro.close()
        return
    task = asyncio.create_task(coro, name=name)
    state.tasks.add(task)
    task.add_done_callback(functools.partial(_done, state.tasks))


def _done(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed (%s)", task.get_name(), type(task.exception()).__name__)


RECOVERY_KEY_FILE = "bot-recovery-key.txt"


async def self_sign(bridge: BridgeContext) -> None:
    """With ``bridge.encryption.self_sign``: give the bot cross-signing keys (kept in its
    server-side secret storage) and sign its device with them, once. The recovery key of that
    storage goes to ``<server.data_dir>/bot-recovery-key.txt`` (a new file, mode 0600), never to
    the log."""
    e2ee = manager(bridge)
    if e2ee is None or not bridge.e2ee_self_sign:
        return
    if await _device_cross_signed(e2ee):
        log.debug("the bot's device is cross-signed already")
        return
    path = Path(bridge.config.core.server.data_dir) / RECOVERY_KEY_FILE
    # The file first (new, 0600, never through a symlink): the keys are made only once the
    # recovery key has a place, so a refusal leaves the device as it was.
    try:
        fd = open_new_private(path)
    except OSError as exc:
        log.error(
            "the bot's device is not cross-signed: %s cannot be created as a new file (%s;"
            " an existing file or symlink there is never overwritten or followed): move it"
            " away and restart",
            path,
            exc.strerror or type(exc).__name__,
        )
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            recovery_key = await e2ee.crypto.generate_recovery_key()
            fh.write(recovery_key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # ours (O_EXCL), maybe empty
        raise
    log.info("the bot's device is cross-signed; the recovery key is in %s", path)


async def _device_cross_signed(e2ee: EncryptionManager) -> bool:
    """Whether the homeserver has the bot's self-signing key and the device's signature by it
    (asked each start: the local trust cache may not know the keys yet after a restart)."""
    client = e2ee.client
    me, device_id = client.mxid, client.device_id
    keys = await client.query_keys({me: [device_id]})
    self_signing = keys.self_signing_keys.get(me)
    device = keys.device_keys.get(me, {}).get(device_id)
    if self_signing is None or device is None:
        return False
    return any(key_id in device.signatures.get(me, {}) for key_id in self_signing.keys)
