"""A Matrix device of each ghost's own in encrypted portals (``bridge.encryption.ghost_devices``).

Without it the bot's device encrypts what every ghost sends: the Megolm session's owner (the
bot) is not the event's sender, and Element (the Rust crypto) shows a red MISMATCHED_SENDER
shield on every ghost message. With it, a ghost's message is encrypted by a device of the ghost:

- the device is created at the ghost's first message in an encrypted portal (never for ghosts
  that only sit in rooms), through MSC4190 (``PUT /devices/{id}`` as the appservice, for the
  ghost), like the bot's;
- its Olm account is in mautrix's crypto store, keyed by the ghost's MXID (the bot's is keyed
  by ``""``): one database, one ``PgCryptoStore`` per ghost; devices, cross-signing keys and
  signatures of other users are shared tables, so the bot's device list tracking serves all;
- the ghost gets cross-signing keys of its own (master and self-signing: a ghost verifies
  nobody), uploaded without UIA (Synapse lets an appservice set them up), and its device is
  signed with them, so clients see a device its owner vouches for: no shield;
- to-device events and one-time-key counts addressed to a ghost's device come in appservice
  transactions (MSC2409, MSC3202) and go to that ghost's machine (:meth:`route_to_device`);
- the ghost's Megolm session goes to the devices of the room's Matrix users (not to ghosts,
  not to the bot: neither needs to read a ghost's messages); Olm sessions with those devices
  are made when a session is first shared (one-time keys claimed then).

The cross-signing private keys are not kept: they are used once, to sign the one device a ghost
ever has. A ghost whose device was lost (deleted on the homeserver) would need new ones, which
clients show as an identity change (not handled yet).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, cast

from mautrix.api import Method, Path
from mautrix.client import Client
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.crypto.cross_signing_key import CrossSigningSeeds
from mautrix.crypto.signature import sign_olm
from mautrix.errors import EncryptionError
from mautrix.types import (
    JSON,
    ASToDeviceEvent,
    CrossSigner,
    CrossSigningKeys,
    CrossSigningUsage,
    DeviceID,
    DeviceOTKCount,
    EncryptedMegolmEventContent,
    EventType,
    KeyID,
    RoomID,
    Serializable,
    StateEvent,
    UserID,
)
from mautrix.util.async_db import Database

from .. import metrics

if TYPE_CHECKING:
    from mautrix.bridge.e2ee import EncryptionManager
    from mautrix.util.logging import TraceLogger

log = logging.getLogger("kalandra.bridge.ghost_devices")

PICKLE_KEY = "mautrix.bridge.e2ee"  # mautrix's, for the bot's account in the same tables
DEVICE_NAME = "Kalandra bridge"


class GhostDevices:
    """The ghosts' machines: loaded at first use, created at a ghost's first encrypted send."""

    def __init__(self, e2ee: EncryptionManager, db: Database) -> None:
        self.e2ee = e2ee
        self.db = db
        self._machines: dict[UserID, OlmMachine] = {}
        self._locks: dict[UserID, asyncio.Lock] = {}
        self._share_locks: dict[tuple[UserID, RoomID], asyncio.Lock] = {}
        self._devices: dict[UserID, DeviceID] = {}  # the ghosts that have one (stored)
        # Synapse sends transactions before the crypto database is open (at start-up).
        self._started = asyncio.Event()

    async def start(self) -> None:
        """Once the crypto database is open: which ghosts have a device."""
        rows = await self.db.fetch(
            "SELECT account_id, device_id FROM crypto_account"
            " WHERE account_id <> '' AND device_id <> ''"
        )
        self._devices = {UserID(r["account_id"]): DeviceID(r["device_id"]) for r in rows}
        self._started.set()
        log.info("%d ghosts have a device of their own", len(self._devices))

    # --- machines -------------------------------------------------------------------------

    async def machine(self, ghost: UserID, create: bool) -> OlmMachine | None:
        """The ghost's machine, its device created (with keys, cross-signed) if ``create``."""
        machine = self._machines.get(ghost)
        if machine is not None:
            return machine
        if not create and ghost not in self._devices:
            return None
        async with self._locks.setdefault(ghost, asyncio.Lock()):
            machine = self._machines.get(ghost)
            if machine is None:
                machine = await self._load(ghost)
                self._machines[ghost] = machine
        return machine

    async def _load(self, ghost: UserID) -> OlmMachine:
        bot = self.e2ee.client
        store = PgCryptoStore(ghost, PICKLE_KEY, self.db)
        await store.open()
        device_id = await store.get_device_id()
        client = Client(
            mxid=ghost,
            base_url=bot.api.base_url,
            token=self.e2ee.az.as_token,
            client_session=bot.api.session,
            log=log.getChild("client"),
            state_store=bot.state_store,
            as_user_id=ghost,
        )
        olm_log = cast("TraceLogger", logging.getLogger("mau.crypto.ghost"))
        machine = OlmMachine(client, store, self.e2ee.crypto.state_store, log=olm_log)
        self._configure(machine)
        await machine.load()  # a new Olm account, stored, when the ghost has none
        assert machine.account is not None
        if not device_id:
            # Stored before the homeserver knows it: a stop in between makes the same device
            # again at the next try (the PUT below is idempotent), not a second one.
            device_id = DeviceID(f"KB{secrets.token_hex(5).upper()}")
            await store.put_device_id(device_id)
        started = time.perf_counter()
        created = not machine.account.shared
        if created:
            # (Without the device in the query: Synapse refuses a device it does not know.)
            await client.create_device_msc4190(device_id, DEVICE_NAME)
            await machine.share_keys()  # device keys and one-time keys
            log.info("ghost %s has a new device %s", ghost, device_id)
        client.device_id = device_id
        client.api.as_device_id = device_id
        if not await self._cross_signed(machine):
            await self._cross_sign(machine)
            created = True
        if created:
            metrics.GHOST_DEVICE_SETUP.observe(time.perf_counter() - started)
        self._devices[ghost] = device_id
        return machine

    def _configure(self, machine: OlmMachine) -> None:
        bot = self.e2ee.crypto
        for name in (
            "share_keys_min_trust",
            "send_keys_min_trust",
            "delete_outbound_keys_on_ack",
            "dont_store_outbound_keys",
            "delete_previous_keys_on_receive",
            "ratchet_keys_on_decrypt",
            "delete_fully_used_keys_on_decrypt",
            "delete_keys_on_device_delete",
            "disable_device_change_key_rotation",
        ):
            setattr(machine, name, getattr(bot, name))
        # Key requests to a ghost's device: the bot's rules (members of the portal only).
        machine.allow_key_share = self.e2ee.allow_key_share

    async def _cross_signed(self, machine: OlmMachine) -> bool:
        """Whether this bridge signed the device with the ghost's self-signing key (the
        signature is recorded only once the homeserver took it)."""
        assert machine.account is not None
        ghost = machine.client.mxid
        keys = await machine.crypto_store.get_cross_signing_keys(ghost)
        ssk = keys.get(CrossSigningUsage.SELF)
        if ssk is None:
            return False
        return await machine.crypto_store.is_key_signed_by(
            CrossSigner(ghost, machine.account.signing_key), CrossSigner(ghost, ssk.key)
        )

    async def _cross_sign(self, machine: OlmMachine) -> None:
        """The ghost's master and self-signing keys, uploaded, and its device signed."""
        assert machine.account is not None
        client, ghost = machine.client, machine.client.mxid
        keys = CrossSigningSeeds.generate().to_keys()
        master_pub, ssk_pub = keys.master_key.public_key, keys.self_signing_key.public_key
        master = CrossSigningKeys(
            user_id=ghost,
            usage=[CrossSigningUsage.MASTER],
            keys={KeyID.ed25519(master_pub): master_pub},
        )
        master.signatures = {
            ghost: {KeyID.ed25519(client.device_id): sign_olm(master, machine.account)}
        }
        self_signing = CrossSigningKeys(
            user_id=ghost,
            usage=[CrossSigningUsage.SELF],
            keys={KeyID.ed25519(ssk_pub): ssk_pub},
        )
        self_signing.signatures = {
            ghost: {KeyID.ed25519(master_pub): sign_olm(self_signing, keys.master_key)}
        }
        # An appservice sets up (or replaces) its users' cross-signing keys without UIA.
        await client.upload_cross_signing_keys(
            {CrossSigningUsage.MASTER: master, CrossSigningUsage.SELF: self_signing}
        )
        device = machine.account.get_device_keys(ghost, client.device_id)
        signature = sign_olm(device, keys.self_signing_key)
        device.signatures = {ghost: {KeyID.ed25519(ssk_pub): signature}}
        resp = await client.api.request(
            Method.POST,
            Path.v3.keys.signatures.upload,
            {ghost: {client.device_id: device.serialize()}},
        )
        if resp.get("failures"):
            raise EncryptionError(f"the device signature of {ghost} was refused")
        store = machine.crypto_store
        await store.put_cross_signing_key(ghost, CrossSigningUsage.MASTER, master_pub)
        await store.put_cross_signing_key(ghost, CrossSigningUsage.SELF, ssk_pub)
        await store.put_signature(
            CrossSigner(ghost, machine.account.signing_key),
            CrossSigner(ghost, ssk_pub),
            signature,
        )
        log.info("the device of ghost %s is cross-signed", ghost)

    # --- sending --------------------------------------------------------------------------

    async def encrypt(
        self, ghost: UserID, room_id: RoomID, event_type: EventType, content: Serializable | JSON
    ) -> EncryptedMegolmEventContent:
        """Megolm-encrypted by the ghost's own device (made now if it has none)."""
        machine = await self.machine(ghost, create=True)
        assert machine is not None
        try:
            return await machine.encrypt_megolm_event(room_id, event_type, content)
        except EncryptionError:
            pass  # no session yet (or expired): share a new one, then encrypt
        async with self._share_locks.setdefault((ghost, room_id), asyncio.Lock()):
            try:  # shared meanwhile by another send of the ghost?
                return await machine.encrypt_megolm_event(room_id, event_type, content)
            except EncryptionError:
                await machine.share_group_session(room_id, await self._recipients(room_id))
            return await machine.encrypt_megolm_event(room_id, event_type, content)

    async def _recipients(self, room_id: RoomID) -> list[UserID]:
        """The room's Matrix users (joined or invited): not the ghosts, not the bot."""
        e2ee = self.e2ee
        users = await e2ee.az.state_store.get_members_filtered(
            room_id, e2ee._id_prefix, e2ee._id_suffix, e2ee.az.bot_mxid
        )
        return [u for u in users if u != e2ee.az.bot_mxid]

    # --- sessions made obsolete -----------------------------------------------------------

    async def handle_member_event(self, evt: StateEvent) -> None:
        """A Matrix user's membership changed: the ghosts' sessions in the room end like the
        bot's (mautrix's rules), so that a new member gets the next session's key."""
        for ghost in await self._ghosts_with_session([evt.room_id]):
            machine = await self.machine(ghost, create=False)
            if machine is not None:
                await machine.handle_member_event(evt)

    async def discard_outbound_sessions(self, rooms: list[RoomID]) -> None:
        """The ghosts' outbound sessions in ``rooms`` end: their next messages start new ones."""
        for room in rooms:
            await self.db.execute(
                "DELETE FROM crypto_megolm_outbound_session"
                " WHERE account_id <> '' AND room_id = $1",
                room,
            )

    async def _ghosts_with_session(self, rooms: list[RoomID]) -> list[UserID]:
        out: list[UserID] = []
        for room in rooms:
            rows = await self.db.fetch(
                "SELECT account_id FROM crypto_megolm_outbound_session"
                " WHERE account_id <> '' AND room_id = $1",
                room,
            )
            out.extend(UserID(r["account_id"]) for r in rows)
        return out

    # --- what comes for ghost devices in transactions -------------------------------------

    async def route_to_device(self, evt: ASToDeviceEvent) -> bool:
        """Handle ``evt`` if it is for a ghost's device; False if it is not."""
        ghost = evt.to_user_id
        await self._started.wait()
        if self._devices.get(ghost) != evt.to_device_id:
            return False
        machine = await self.machine(ghost, create=False)
        if machine is not None:
            await machine.handle_as_to_device_event(evt)
        return True

    async def route_otk_counts(
        self, counts: dict[UserID, dict[DeviceID, DeviceOTKCount]]
    ) -> dict[UserID, dict[DeviceID, DeviceOTKCount]]:
        """Handle the counts of ghosts' devices; the others are returned."""
        rest: dict[UserID, dict[DeviceID, DeviceOTKCount]] = {}
        if any(self.e2ee._ignore_user(user_id) for user_id in counts):  # (ghosts)
            await self._started.wait()
        for user_id, devices in counts.items():
            if user_id not in self._devices:
                if not self.e2ee._ignore_user(user_id):
                    rest[user_id] = devices
                # (else a ghost whose device is being made: nothing to replenish yet)
                continue
            for device_id, count in devices.items():
                if self._devices[user_id] != device_id:
                    # Synapse keeps a user's cross-signing keys as hidden devices, and
                    # counts those too: nothing to do.
                    continue
                machine = self._machines.get(user_id)
                if machine is None and _low(count):  # loaded only when it has work
                    machine = await self.machine(user_id, create=False)
                if machine is not None:
                    await machine.handle_otk_count(count)
        return rest


def _low(count: DeviceOTKCount) -> bool:
    return count.signed_curve25519 < 25


def install(e2ee: EncryptionManager, ghosts: GhostDevices) -> None:
    """Route what comes for ghosts' devices to their machines, and end their sessions when
    the bot's end (members, devices)."""
    az = e2ee.az
    bot_to_device = e2ee.crypto.handle_as_to_device_event

    async def to_device(evt: ASToDeviceEvent) -> None:
        if evt.to_user_id == az.bot_mxid or not await ghosts.route_to_device(evt):
            await bot_to_device(evt)

    az.to_device_handler = to_device
    bot_otk = e2ee.crypto.handle_as_otk_counts

    async def otk_counts(counts: dict[UserID, dict[DeviceID, DeviceOTKCount]]) -> None:
        rest = await ghosts.route_otk_counts(counts)
        bot, device = az.bot_mxid, e2ee.crypto.client.device_id
        if bot in rest:  # the bot's cross-signing keys count as hidden devices too: not ours
            rest[bot] = {d: c for d, c in rest[bot].items() if d == device}
        if any(rest.values()):
            await bot_otk(rest)

    az.otk_handler = otk_counts
    bot_member = e2ee.handle_member_event

    async def member_event(evt: StateEvent) -> None:
        await bot_member(evt)
        if not e2ee._ignore_user(evt.state_key):
            await ghosts.handle_member_event(evt)

    e2ee.handle_member_event = member_event  # type: ignore[method-assign]
    bot_devices_changed = e2ee.crypto.on_devices_changed

    async def devices_changed(user_id: UserID) -> None:
        await bot_devices_changed(user_id)
        if not e2ee.crypto.disable_device_change_key_rotation:
            await ghosts.discard_outbound_sessions(
                await e2ee.crypto.state_store.find_shared_rooms(user_id)
            )

    e2ee.crypto.on_devices_changed = devices_changed  # type: ignore[method-assign]
