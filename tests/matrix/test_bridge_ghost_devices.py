"""Ghosts' own devices in encrypted portals (``bridge.encryption.ghost_devices``), as Matrix
clients see them: a nio client (vodozemac) and matrix-js-sdk with the Rust crypto (Element's)
decrypt what a native member sends, the ghost has one device, signed by the ghost's own
self-signing key (Element then shows no shield), and a restart of the bridge keeps that device.
With the switch off, the bot's device encrypts for the ghosts, as before (a red shield).

Each test also prints what encryption costs the bridge (its metrics: a new ghost's device, the
first message of a ghost in a portal, then each message), the measure of ghost devices against
the bot's device: ``pytest -s`` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nio import AsyncClient, RoomInviteResponse, SyncResponse, UnknownToDeviceEvent
from prometheus_client.parser import text_string_to_metric_families

from kalandra_core.client.driver import Client
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
)
from matrix.jsclient import JsClient, JsEvent, js_client
from matrix.synapse import free_port
from matrix.test_bridge_encryption import wait_decrypted


@dataclass
class Portal:
    stack: BridgeStack
    alice: AsyncClient  # bridge admin (nio)
    native: Client
    js: JsClient
    room_id: bytes  # the Kalandra room
    portal: str  # its Matrix room
    metrics_port: int


@contextlib.asynccontextmanager
async def encrypted_portal(
    work: Path,
    ghost_devices: bool,
    database: str = "sqlite",
    encryption: dict[str, Any] | None = None,
) -> AsyncIterator[Portal]:
    """``encryption``: more options of ``bridge.encryption``."""
    port = free_port()
    async with bridge_stack(
        work,
        database,
        options={"metrics.enabled": True, "metrics.listen_port": port},
        others=("user",),
        bridge_options={
            "encryption.allow": True,
            "encryption.default": True,
            "encryption.ghost_devices": ghost_devices,
            **{f"encryption.{k}": v for k, v in (encryption or {}).items()},
        },
    ) as stack:
        native = await native_client(stack)
        async with (
            nio_client(stack.synapse, stack.user, encrypted=True) as alice,
            js_client(stack.synapse, stack.others["user"]) as js,
        ):
            room_hex, portal = await portal_with_native(alice, native, "ghost devices")
            invited = await alice.room_invite(portal, js.user_id)
            assert isinstance(invited, RoomInviteResponse), invited
            assert await js.join(portal), "the portal is not encrypted for the js client"
            yield Portal(stack, alice, native, js, bytes.fromhex(room_hex), portal, port)
        await native.close()


async def keys_of(alice: AsyncClient, user_id: str) -> dict[str, Any]:
    """The homeserver's answer to /keys/query for ``user_id`` (as ``alice`` asks it)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{alice.homeserver}/_matrix/client/v3/keys/query",
            json={"device_keys": {user_id: []}},
            headers={"Authorization": f"Bearer {alice.access_token}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        keys: dict[str, Any] = await resp.json()
        return keys


def signed_by_self_signing_key(keys: dict[str, Any], user_id: str, device_id: str) -> bool:
    self_signing = keys.get("self_signing_keys", {}).get(user_id)
    if self_signing is None:
        return False
    device = keys["device_keys"][user_id][device_id]
    return any(key_id in device["signatures"].get(user_id, {}) for key_id in self_signing["keys"])


async def sent_and_seen(p: Portal, text: str) -> JsEvent:
    """``text`` from the native member, decrypted by the nio client and the js client; the js
    client's view of it."""
    ghost = ghost_of(p.native)
    before = len(await wait_decrypted(p.alice, p.portal, ghost, 0))
    await p.native.send_text(p.room_id, text)
    seen = await wait_decrypted(p.alice, p.portal, ghost, before + 1)
    assert text in [e.body for e in seen]

    def arrived(events: list[JsEvent]) -> bool:
        return any(e.sender == ghost and e.body == text for e in events)

    events = await p.js.wait_timeline(p.portal, arrived, f"the ghost's {text!r}")
    [message] = [e for e in events if e.sender == ghost and e.body == text]
    assert (message.wire_type, message.decryption_failure) == ("m.room.encrypted", False)
    return message


async def key_request_answer(p: Portal, ghost: str, device_id: str) -> dict[str, Any]:
    """alice asks the ghost's device for the room key of its last message (as a client asks
    the sending device for a key it lacks); the answer that comes to alice's device."""
    seen = await wait_decrypted(p.alice, p.portal, ghost, 1)
    session_id, sender_key = seen[-1].session_id, seen[-1].sender_key
    request = {
        "action": "request",
        "request_id": secrets.token_hex(8),
        "requesting_device_id": p.alice.device_id,
        "body": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": p.portal,
            "session_id": session_id,
            "sender_key": sender_key,
        },
    }
    await p.alice.sync(timeout=0)  # what came before is not the answer
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{p.alice.homeserver}/_matrix/client/v3/sendToDevice/m.room_key_request/"
            f"{secrets.token_hex(8)}",
            json={"messages": {ghost: {device_id: request}}},
            headers={"Authorization": f"Bearer {p.alice.access_token}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
    async with asyncio.timeout(30):  # (a TimeoutError: no answer from the ghost's device)
        while True:
            response = await p.alice.sync(timeout=1000)
            assert isinstance(response, SyncResponse), response
            for event in response.to_device_events:
                if (
                    isinstance(event, UnknownToDeviceEvent)
                    and event.type == "m.room_key.withheld"
                    and event.sender == ghost
                    and event.source["content"].get("session_id") == session_id
                ):
                    content: dict[str, Any] = event.source["content"]
                    return content


async def costs(port: int) -> dict[str, float]:
    """The bridge's encryption metrics so far: {"<device>_count" / "<device>_sum": value},
    device "ghost" or "bot" (encryptions), "setup" (ghost devices made)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    names = {
        "kalandra_bridge_megolm_encrypt_seconds": None,
        "kalandra_bridge_ghost_device_setup_seconds": "setup",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        for sample in family.samples:
            suffix = sample.name.rpartition("_")[2]
            if suffix in ("count", "sum"):
                device = names[family.name] or sample.labels["device"]
                out[f"{device}_{suffix}"] = sample.value
    return out


async def measure(p: Portal, device: str, first: JsEvent) -> JsEvent:
    """Prints the bridge's cost of the ghost's first message (``first``, sent already) and of
    each of ``N`` more, encrypted by ``device`` ("ghost" or "bot"); returns the last one."""
    after_first = await costs(p.metrics_port)
    last = first
    for i in range(MEASURED):
        last = await sent_and_seen(p, f"measured {i}")
    after = await costs(p.metrics_port)
    count = after[f"{device}_count"] - after_first[f"{device}_count"]
    each = (after[f"{device}_sum"] - after_first[f"{device}_sum"]) / count
    setup = after_first.get("setup_sum", 0.0)
    print(
        f"\n[cost, {device} device] new ghost's device: {setup * 1000:.1f} ms"
        f" ({after_first.get('setup_count', 0):.0f} made); first message (the device setup,"
        " if any, and the session shared):"
        f" {after_first[f'{device}_sum'] * 1000:.1f} ms; each next message:"
        f" {each * 1000:.2f} ms (mean of {count:.0f})"
    )
    return last


MEASURED = 10


@pytest.mark.asyncio
@pytest.mark.parametrize("database", DATABASES)
async def test_a_ghost_gets_one_cross_signed_device_that_a_restart_keeps(
    tmp_path: Path, database: str
) -> None:
    async with encrypted_portal(tmp_path, ghost_devices=True, database=database) as p:
        ghost = ghost_of(p.native)
        message = await sent_and_seen(p, "first, from my own device")
        assert (message.shield_colour, message.shield_reason) == ("NONE", None)
        keys = await keys_of(p.alice, ghost)
        [device_id] = keys["device_keys"][ghost]
        assert signed_by_self_signing_key(keys, ghost, device_id)
        # To-device events for the ghost's device reach its machine: a key request from a
        # device the bridge does not trust (not cross-signed) is refused by the ghost's device.
        answer = await key_request_answer(p, ghost, device_id)
        assert answer["code"] == "m.unverified", answer
        last = await measure(p, "ghost", message)
        assert (last.shield_colour, last.shield_reason) == ("NONE", None)

        await p.stack.stop_bridge()
        await p.stack.restart()
        message = await sent_and_seen(p, "after the restart, the same device")
        assert (message.shield_colour, message.shield_reason) == ("NONE", None)
        keys = await keys_of(p.alice, ghost)
        assert list(keys["device_keys"][ghost]) == [device_id]


@pytest.mark.asyncio
async def test_with_the_switch_off_the_bots_device_encrypts_for_the_ghosts(tmp_path: Path) -> None:
    async with encrypted_portal(tmp_path, ghost_devices=False) as p:
        ghost = ghost_of(p.native)
        message = await sent_and_seen(p, "from the bot's device")
        # The Megolm session's owner (the bot) is not the sender (the ghost): red, as before.
        assert (message.shield_colour, message.shield_reason) == ("RED", "MISMATCHED_SENDER")
        assert (await keys_of(p.alice, ghost))["device_keys"].get(ghost, {}) == {}
        await measure(p, "bot", message)
