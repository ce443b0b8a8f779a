"""MSC4350 (bridge/encryption/msc4350.py): when the bridge impersonates ghosts with the bot's
device, and
the impersonatable device keys it uploads for a ghost, signed with a real Olm account."""

from __future__ import annotations

import copy
from typing import Any, cast

import pytest
from mautrix.crypto import OlmAccount
from mautrix.crypto.signature import SignedObject, verify_signature_json
from mautrix.types import DeviceID, SigningKey, UserID

from bridge.encryption.msc4350 import FEATURES, IMPERSONATOR, decide, impersonatable_device

READY = {"appservice": True, "msc4190": True, "self_sign": True, "ghost_devices": True}


@pytest.mark.parametrize("flag", FEATURES)
def test_on_and_advertised_it_impersonates(flag: str) -> None:
    decision = decide(enabled=True, unstable_features={flag: True}, **READY)
    assert (decision.impersonate, decision.warning) == (True, None)


def test_off_it_never_impersonates_and_says_nothing() -> None:
    for features in ({}, {FEATURES[0]: True}):
        decision = decide(enabled=False, unstable_features=features, **READY)
        assert (decision.impersonate, decision.warning) == (False, None)


@pytest.mark.parametrize(
    "features",
    [
        {},
        {FEATURES[0]: False},
        {"org.matrix.msc4190": True, "fi.mau.msc4350.impersonator": True},  # not the flag
    ],
)
def test_on_but_not_advertised_it_falls_back_with_a_warning(features: dict[str, bool]) -> None:
    decision = decide(enabled=True, unstable_features=features, **READY)
    assert not decision.impersonate
    assert decision.warning is not None
    assert "does not advertise" in decision.warning
    assert all(flag in decision.warning for flag in FEATURES)
    assert decision.warning.endswith("encrypted by their own devices instead")
    without_ghost_devices = decide(
        enabled=True, unstable_features=features, **(READY | {"ghost_devices": False})
    )
    assert without_ghost_devices.warning is not None
    assert without_ghost_devices.warning.endswith("encrypted by the bot's device instead")


@pytest.mark.parametrize(
    ("missing", "named"),
    [("appservice", "msc4190"), ("msc4190", "msc4190"), ("self_sign", "self_sign")],
)
def test_advertised_but_the_bridge_cannot_it_falls_back_saying_why(
    missing: str, named: str
) -> None:
    decision = decide(
        enabled=True, unstable_features={FEATURES[0]: True}, **(READY | {missing: False})
    )
    assert not decision.impersonate
    assert decision.warning is not None
    assert named in decision.warning


def test_the_impersonatable_device_names_the_bots_device_and_is_signed_by_it() -> None:
    account = OlmAccount()
    bot, ghost, device = UserID("@bot:hs"), UserID("@kalandra_1:hs"), DeviceID("BOTDEVICE")
    keys = impersonatable_device(ghost, bot, device, account)

    assert (keys["user_id"], keys["device_id"]) == (ghost, device)
    assert (keys["algorithms"], keys["keys"]) == ([], {})  # no keys of its own
    bot_keys = account.get_device_keys(bot, device).serialize()
    del bot_keys["signatures"], bot_keys["unsigned"]
    # The bot's device keys, without their signatures (nor anything unsigned).
    assert keys[IMPERSONATOR] == bot_keys
    # Signed by the bot's device only (not by the ghost: it has no key).
    assert list(keys["signatures"]) == [bot]
    ed25519 = SigningKey(account.signing_key)
    assert verify_signature_json(_signed(copy.deepcopy(keys)), bot, device, ed25519)

    tampered: dict[str, Any] = copy.deepcopy(keys)
    tampered[IMPERSONATOR]["keys"][f"curve25519:{device}"] = "A" * 43
    assert not verify_signature_json(_signed(tampered), bot, device, ed25519)
    other = SigningKey(OlmAccount().signing_key)
    assert not verify_signature_json(_signed(copy.deepcopy(keys)), bot, device, other)


def _signed(keys: dict[str, Any]) -> SignedObject:
    return cast("SignedObject", keys)  # (mautrix types it as its own TypedDict)
