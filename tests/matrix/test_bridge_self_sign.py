"""`bridge.encryption.self_sign`: the bot's device is cross-signed with keys the bot publishes
(Synapse's /keys/query shows its master and self-signing keys and the device's signature by
the latter), once across restarts, and the recovery key is in a 0600 file, not in the log."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.encryption.e2ee import RECOVERY_KEY_FILE
from matrix.bridge_stack import BOT, BridgeStack, bridge_stack, nio_client


async def bot_keys(stack: BridgeStack, token: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{stack.synapse.url}/_matrix/client/v3/keys/query",
            json={"device_keys": {BOT: []}},
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def self_signing_key_id(keys: dict[str, Any]) -> str:
    (key_id,) = keys["self_signing_keys"][BOT]["keys"]
    return str(key_id)


@pytest.mark.asyncio
async def test_the_bot_cross_signs_its_device(tmp_path: Path) -> None:
    async with (
        bridge_stack(
            tmp_path,
            "sqlite",
            bridge_options={"encryption.allow": True, "encryption.self_sign": True},
        ) as stack,
        nio_client(stack.synapse, stack.user) as alice,
    ):
        assert alice.access_token
        keys = await bot_keys(stack, alice.access_token)
        assert BOT in keys["master_keys"]
        signer = self_signing_key_id(keys)
        (device,) = keys["device_keys"][BOT].values()
        assert signer in device["signatures"][BOT]

        recovery = tmp_path / RECOVERY_KEY_FILE
        assert stat.S_IMODE(recovery.stat().st_mode) == 0o600
        secret = recovery.read_text().strip()
        assert len(secret) > 40
        assert secret not in stack.log.read_text()
        assert secret.replace(" ", "") not in stack.log.read_text().replace(" ", "")

        # A restart keeps the same keys (nothing is generated again).
        await stack.stop_bridge()
        await stack.restart()
        again = await bot_keys(stack, alice.access_token)
        assert self_signing_key_id(again) == signer
        assert recovery.read_text().strip() == secret
