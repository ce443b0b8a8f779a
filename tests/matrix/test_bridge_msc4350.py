"""``bridge.encryption.msc4350`` against a real Synapse.

Synapse 1.163 does not advertise MSC4350 in ``/_matrix/client/versions``: with the option on,
the bridge says so once at start and ghosts encrypt with their own devices, as without it
(Element's crypto shows no shield).

Where a homeserver advertises it, the bridge impersonates: what such a homeserver must do
beyond Synapse (the MSC's server rule: the impersonator's signature in every ``/keys/query``
answer) Synapse already does, since it keeps device keys as uploaded. So the second test puts
a proxy in front of Synapse, for the bridge only, that adds the flag to ``/versions`` and
passes everything else through unchanged, and checks what Matrix clients get: the ghost's one
device, without keys, naming the bot's device and signed by it; the ghost's message encrypted
by the bot's device (its Megolm session) and decrypted by a nio client; no ghost device made.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from mautrix.crypto.signature import SignedObject, verify_signature_json
from mautrix.types import SigningKey, UserID
from ruamel.yaml import YAML

from bridge.encryption.msc4350 import FEATURES, IMPERSONATOR
from matrix.bridge_stack import (
    BOT,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
)
from matrix.synapse import free_port
from matrix.test_bridge_encryption import wait_decrypted
from matrix.test_bridge_ghost_devices import (
    costs,
    encrypted_portal,
    keys_of,
    sent_and_seen,
    signed_by_self_signing_key,
)

WARNING = "bridge.encryption.msc4350 is on"
IMPERSONATING = "impersonating (MSC4350)"


async def unstable_features(base_url: str) -> dict[str, bool]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url}/_matrix/client/versions") as resp,
    ):
        assert resp.status == 200, await resp.text()
        features: dict[str, bool] = (await resp.json()).get("unstable_features", {})
        return features


@pytest.mark.asyncio
async def test_without_homeserver_support_it_warns_once_and_ghosts_keep_their_own_devices(
    tmp_path: Path,
) -> None:
    async with encrypted_portal(tmp_path, ghost_devices=True, encryption={"msc4350": True}) as p:
        features = await unstable_features(p.stack.synapse.url)
        assert not any(features.get(flag) for flag in FEATURES), features  # the premise
        warnings = [line for line in p.stack.log.read_text().splitlines() if WARNING in line]
        assert len(warnings) == 1, warnings
        assert "WARNING" in warnings[0]
        assert "does not advertise" in warnings[0]
        assert "encrypted by their own devices instead" in warnings[0]

        ghost = ghost_of(p.native)
        message = await sent_and_seen(p, "msc4350 is on, but not here")
        assert (message.shield_colour, message.shield_reason) == ("NONE", None)
        keys = await keys_of(p.alice, ghost)
        [(device_id, device)] = keys["device_keys"][ghost].items()
        assert IMPERSONATOR not in device
        assert device["keys"]  # keys of its own
        assert signed_by_self_signing_key(keys, ghost, device_id)
        assert IMPERSONATING not in p.stack.log.read_text()


@contextlib.asynccontextmanager
async def advertising(upstream: str, flag: str) -> AsyncIterator[str]:
    """An HTTP proxy to ``upstream`` (its URL) whose ``/_matrix/client/versions`` also has
    ``flag`` among the unstable features; every other request and answer passes unchanged."""
    hop_by_hop = {"host", "content-length", "transfer-encoding", "content-encoding", "connection"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def forward(request: web.Request) -> web.Response:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop_by_hop}
            async with http.request(
                request.method,
                f"{upstream}{request.raw_path}",
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                answer = {k: v for k, v in resp.headers.items() if k.lower() not in hop_by_hop}
            if request.path == "/_matrix/client/versions" and resp.status == 200:
                versions = json.loads(body)
                versions.setdefault("unstable_features", {})[flag] = True
                body = json.dumps(versions).encode()
            return web.Response(status=resp.status, body=body, headers=answer)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


def set_homeserver(config: Path, address: str) -> None:
    yaml = YAML()
    data = yaml.load(config.read_text())
    data["homeserver"]["address"] = address
    with open(config, "w", encoding="utf-8") as fh:
        yaml.dump(data, fh)


def unsigned(keys: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in keys.items() if k not in ("signatures", "unsigned")}


@pytest.mark.asyncio
async def test_with_support_advertised_the_bots_device_impersonates_the_ghosts(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    async with (
        bridge_stack(
            tmp_path,
            "sqlite",
            bridge_options={
                "encryption.allow": True,
                "encryption.default": True,
                "encryption.self_sign": True,
                "encryption.ghost_devices": True,
                "encryption.msc4350": True,
            },
            options={"metrics.enabled": True, "metrics.listen_port": metrics_port},
            start=False,
        ) as stack,
        advertising(stack.synapse.url, FEATURES[0]) as proxy,
    ):
        set_homeserver(stack.config, proxy)
        await stack.restart()
        native = await native_client(stack)
        async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
            room_hex, portal = await portal_with_native(alice, native, "impersonated")
            ghost = ghost_of(native)
            await native.send_text(bytes.fromhex(room_hex), "from the bot's device, as me")
            [message] = await wait_decrypted(alice, portal, ghost, 1)
            assert message.body == "from the bot's device, as me"

            bot_keys = await keys_of(alice, BOT)
            [(bot_device, bot_device_keys)] = bot_keys["device_keys"][BOT].items()
            # The bot's Megolm session encrypted it (no session of the ghost's own).
            assert message.sender_key == bot_device_keys["keys"][f"curve25519:{bot_device}"]
            keys = await keys_of(alice, ghost)
            [(device_id, device)] = keys["device_keys"][ghost].items()
            assert device_id == bot_device
            assert (device["algorithms"], device["keys"]) == ([], {})
            assert device[IMPERSONATOR] == unsigned(bot_device_keys)
            ed25519 = SigningKey(bot_device_keys["keys"][f"ed25519:{bot_device}"])
            # Signed by the bot's device (what the bridge signed, as Synapse keeps it).
            assert verify_signature_json(
                cast("SignedObject", dict(device)), UserID(BOT), bot_device, ed25519
            )
            spent = await costs(metrics_port)
            assert spent.get("msc4350_count", 0) >= 1
            assert spent.get("setup_count", 0) == 0  # no ghost device of its own
            assert spent.get("ghost_count", 0) == 0

            # A restart uploads the same device again: still one, unchanged.
            await stack.stop_bridge()
            await stack.restart()
            await native.wait_connected()
            await native.send_text(bytes.fromhex(room_hex), "after a restart")
            seen = await wait_decrypted(alice, portal, ghost, 2)
            assert seen[-1].body == "after a restart"
            again = await keys_of(alice, ghost)
            assert again["device_keys"][ghost] == keys["device_keys"][ghost]
        await native.close()
        await stack.stop_bridge()  # before the proxy goes
        log = stack.log.read_text()
        assert log.count(IMPERSONATING) == 2  # once per start
        assert WARNING not in log
