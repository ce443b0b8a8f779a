"""MSC4350, encryption impersonation for appservices (``bridge.encryption.msc4350``, off by
default): ghosts' messages encrypted by the bot's device, which each ghost names as its
impersonator, instead of a device of each ghost's own (ghost_devices.py).

Each ghost gets one "impersonatable" device: its device keys have no keys and no algorithms and
carry the bot's device keys (without their signatures) in ``fi.mau.msc4350.impersonator`` (the
MSC's unstable name of ``impersonator``), signed by the bot's device. Clients that implement
the MSC then show a ghost's message that the bot's device encrypted as sent by the ghost, as
long as the bot is in the room and its device is cross-signed (``self_sign``). The device has
the bot's device id (one per ghost, made with MSC4190 like ghosts' own devices), and is uploaded
again at each ghost's first encrypted message after a start: the upload of unchanged keys
changes nothing on the homeserver. No Olm account, no Olm sessions and no Megolm session per
ghost: a new member's first message costs two requests instead of a device with its keys,
cross-signing and a session shared with every recipient device.

The MSC defines no flag in ``/_matrix/client/versions``. The bridge uses it only where the
homeserver says it implements it: ``unstable_features`` naming it with the MSC's own unstable
prefix (``fi.mau.msc4350``) or the Matrix one (``org.matrix.msc4350``), true. Otherwise, with
the option on, it logs one warning at start and encrypts as without it (the ghosts' own
devices with ``ghost_devices``, else the bot's device).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mautrix.api import Method, Path
from mautrix.client import Client
from mautrix.crypto.signature import sign_olm
from mautrix.types import DeviceID, KeyID, UserID

if TYPE_CHECKING:
    from mautrix.bridge.e2ee import EncryptionManager
    from mautrix.crypto import OlmAccount

    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.msc4350")

IMPERSONATOR = "fi.mau.msc4350.impersonator"
FEATURES = ("fi.mau.msc4350", "org.matrix.msc4350")  # in /versions' unstable_features
DEVICE_NAME = "Kalandra bridge (impersonated)"


@dataclass(frozen=True, slots=True)
class Decision:
    impersonate: bool
    warning: str | None = None  # logged once at start: the option is on but not used


def decide(
    *,
    enabled: bool,
    unstable_features: Mapping[str, bool],
    appservice: bool,
    msc4190: bool,
    self_sign: bool,
    ghost_devices: bool,
) -> Decision:
    """Whether ghosts' messages go out through MSC4350: the option, what the homeserver
    advertises and the rest of ``bridge.encryption``."""
    if not enabled:
        return Decision(False)
    if not any(unstable_features.get(flag) is True for flag in FEATURES):
        why = (
            "the homeserver does not advertise it (none of "
            + ", ".join(FEATURES)
            + " in the unstable_features of /_matrix/client/versions)"
        )
    elif not (appservice and msc4190):
        why = "it needs bridge.encryption.appservice and msc4190 (the ghosts' devices)"
    elif not self_sign:
        # Clients trust an impersonator's messages only if its device is cross-signed: the
        # ghosts' own devices (cross-signed) are then the better choice.
        why = "it needs bridge.encryption.self_sign (clients trust a cross-signed bot only)"
    else:
        return Decision(True)
    instead = "their own devices" if ghost_devices else "the bot's device"
    return Decision(
        False,
        f"bridge.encryption.msc4350 is on, but {why}: ghosts' messages are encrypted by"
        f" {instead} instead",
    )


def impersonatable_device(
    ghost: UserID, bot: UserID, device_id: DeviceID, account: OlmAccount
) -> dict[str, Any]:
    """The ghost's device keys naming the bot's device (``account``, ``device_id``) as its
    impersonator, signed by that device."""
    bot_keys = account.get_device_keys(bot, device_id).serialize()
    bot_keys.pop("signatures", None)  # the MSC: the impersonator's keys without them
    bot_keys.pop("unsigned", None)
    device: dict[str, Any] = {
        "user_id": ghost,
        "device_id": device_id,
        "algorithms": [],
        "keys": {},
        IMPERSONATOR: bot_keys,
    }
    signature = sign_olm(dict(device), account)
    device["signatures"] = {bot: {str(KeyID.ed25519(device_id)): signature}}
    return device


class Impersonation:
    """Each ghost's impersonatable device, made at its first encrypted message."""

    def __init__(self, e2ee: EncryptionManager) -> None:
        self.e2ee = e2ee
        self._done: set[UserID] = set()  # uploaded since the start
        self._locks: dict[UserID, asyncio.Lock] = {}

    async def ensure(self, ghost: UserID) -> None:
        if ghost in self._done:
            return
        async with self._locks.setdefault(ghost, asyncio.Lock()):
            if ghost in self._done:
                return
            bot = self.e2ee.client
            machine = self.e2ee.crypto
            assert machine.account is not None
            device_id = bot.device_id
            client = Client(
                mxid=ghost,
                base_url=bot.api.base_url,
                token=self.e2ee.az.as_token,
                client_session=bot.api.session,
                log=log.getChild("client"),
                as_user_id=ghost,
            )
            # The same device id as the bot's: idempotent, and nothing else to keep.
            await client.create_device_msc4190(device_id, DEVICE_NAME)
            keys = impersonatable_device(ghost, bot.mxid, device_id, machine.account)
            await client.api.request(Method.POST, Path.v3.keys.upload, {"device_keys": keys})
            self._done.add(ghost)
            log.info("ghost %s has an impersonatable device %s", ghost, device_id)


def setup(bridge: BridgeContext, e2ee: EncryptionManager | None) -> None:
    """At start, once the homeserver's versions are known: MSC4350 or not, and why not."""
    if not bridge.config["bridge.encryption.msc4350"]:
        return
    if e2ee is None:
        log.warning(
            "bridge.encryption.msc4350 is on, but bridge.encryption.allow is off: no encryption"
        )
        return
    decision = decide(
        enabled=True,
        unstable_features=bridge.matrix.versions.unstable_features,
        appservice=e2ee.appservice_mode,
        msc4190=e2ee.msc4190,
        self_sign=bridge.e2ee_self_sign,
        ghost_devices=bridge.ghost_devices is not None,
    )
    if decision.warning is not None:
        log.warning("%s", decision.warning)
    if decision.impersonate:
        bridge.impersonation = Impersonation(e2ee)
        log.info("ghosts' messages are encrypted by the bot's device, impersonating (MSC4350)")
