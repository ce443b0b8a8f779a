"""Start-up with many portals: new work is served while the bot is still catching its rooms up.

After a start the bot's one session to the embedded server catches every room up from its
saved state. Here every sync read of the embedded server is made slow
(``KALANDRA_TEST_SYNC_LAG``: the latency of a busy store), so that catching up PORTALS rooms
takes PORTALS x LAG seconds, longer than the bot waits for the server's answer to a request.
While that catch-up runs, a new portal is made through the provisioning API at the first
attempt (no 504), a native member's message in an existing portal reaches Matrix once, and a
Matrix message there reaches the native member; the readiness probe counts the rooms still
catching up, and shows that they were. In the end every room is caught up.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from ruamel.yaml import YAML

from kalandra_core.client.content import Content
from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    BridgeStack,
    bridge_stack,
    ghost_of,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    say,
    wait_history,
)

PORTALS = 16  # idle portals besides the one with a native member
LAG = "1.0"  # seconds each sync read of the embedded server takes, after the restart
WITHIN = 60.0
PREFIX = "/_matrix/provision/v1"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("startup"), "sqlite") as stack:
        yield stack


@pytest.fixture
def slow_syncs() -> Iterator[None]:
    """Bridge processes started meanwhile answer each sync read LAG seconds late."""
    before = os.environ.get("KALANDRA_TEST_SYNC_LAG")
    os.environ["KALANDRA_TEST_SYNC_LAG"] = LAG
    try:
        yield
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_SYNC_LAG"]
        else:
            os.environ["KALANDRA_TEST_SYNC_LAG"] = before


def shared_secret(stack: BridgeStack) -> str:
    with open(stack.config, encoding="utf-8") as fh:
        return str(YAML(typ="safe").load(fh)["bridge"]["provisioning"]["shared_secret"])


async def provisioning(
    stack: BridgeStack, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    secret = shared_secret(stack)
    url = f"http://127.0.0.1:{stack.as_port}{PREFIX}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WITHIN)) as http,
        http.request(
            method,
            url,
            params={"user_id": f"@{stack.user}:localhost"},
            headers={"Authorization": f"Bearer {secret}"},
            json=body,
        ) as response,
    ):
        return response.status, await response.json()


async def catching_up(stack: BridgeStack) -> int:
    """Rooms the bot has not caught up yet since its start, as the readiness probe says."""
    url = f"http://127.0.0.1:{stack.as_port}/_matrix/mau/ready"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        body = await response.json()
    assert response.status == 200, body
    count = body.get("rooms_catching_up")
    assert isinstance(count, int), body
    return count


async def test_new_work_is_served_while_rooms_catch_up(
    stack: BridgeStack, slow_syncs: None
) -> None:
    async with nio_client(stack.synapse, stack.user) as alice:
        native = await native_client(stack)
        try:
            room_hex, portal = await portal_with_native(alice, native, "busy")
            room = bytes.fromhex(room_hex)
            for i in range(PORTALS):
                status, made = await provisioning(stack, "POST", "/rooms", {"name": f"idle {i}"})
                assert status == 201, made

            await stack.stop_bridge()
            await stack.restart()  # syncs are slow from now on

            # A new portal, at the first attempt.
            status, made = await provisioning(stack, "POST", "/rooms", {"name": "new"})
            assert status == 201, made
            assert await catching_up(stack) > 0, "catch-up was over before the new portal"

            # Both ways in an existing portal.
            tag = secrets.token_hex(3)
            await native.wait_connected()
            await asyncio.wait_for(native.send(room, Content(f"from native {tag}")), WITHIN)
            seen = await wait_history(alice, portal, ghost_of(native), 1, WITHIN)
            assert [body for _, body in seen] == [f"from native {tag}"]
            received: list[Message] = []
            await say(alice, portal, f"from matrix {tag}")
            await asyncio.wait_for(messages_from_others(native, received, 1, room), WITHIN)
            assert [m.content.body for m in received] == [f"from matrix {tag}"]
            assert await catching_up(stack) > 0, "catch-up was over before both messages"

            async with asyncio.timeout(WITHIN * 2):
                while await catching_up(stack):  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
            # Caught up: nothing doubled.
            seen = await wait_history(alice, portal, ghost_of(native), 1, WITHIN)
            assert [body for _, body in seen] == [f"from native {tag}"]
        finally:
            await native.close()
