"""Rooms of the bridge's users that are no portals, against a real Synapse: Synapse sends the
bridge every event of a room where one of its users (a ghost) is, portal or not. Messages there
are nobody's business: the bot does not join such a room (a public one would let it) nor
report each message "Unknown room" there, and the portals' traffic is not held up by it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nio import AsyncClient, RoomCreateResponse, RoomPreset
from ruamel.yaml import YAML

from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    command,
    nio_client,
    open_dm,
    room_history,
    say,
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("foreign")) as stack:
        yield stack


async def _as_user(stack: BridgeStack, localpart: str, method: str, path: str, body: Any) -> Any:
    """A client-server request as ``localpart`` of the bridge's namespace (appservice token)."""
    registration = YAML(typ="safe").load((stack.work / "registration.yaml").read_text())
    url = f"{stack.synapse.url}/_matrix/client/v3{path}"
    headers = {"Authorization": f"Bearer {registration['as_token']}"}
    params = {"user_id": f"@{localpart}:localhost"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers, params=params) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _bot_membership(alice: AsyncClient, room: str) -> str | None:
    state = await alice.room_get_state_event(room, "m.room.member", BOT)
    return getattr(state, "content", {}).get("membership")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_ghosts_room_that_is_no_portal_is_left_alone(stack: BridgeStack) -> None:
    ghost = f"kalandra_foreign{secrets.token_hex(3)}"
    async with nio_client(stack.synapse, stack.user) as alice:
        created = await alice.room_create(preset=RoomPreset.public_chat)  # (the bot could join it)
        assert isinstance(created, RoomCreateResponse), created
        room = str(created.room_id)
        status, answer = await _as_user(
            stack,
            ghost,
            "POST",
            "/register",
            {"type": "m.login.application_service", "username": ghost, "inhibit_login": True},
        )
        assert status == 200, answer
        status, answer = await _as_user(stack, ghost, "POST", f"/join/{room}", {})
        assert status == 200, answer
        for i in range(3):
            await say(alice, room, f"hello {i}")
        status, answer = await _as_user(
            stack,
            ghost,
            "PUT",
            f"/rooms/{room}/send/m.room.message/t{secrets.token_hex(4)}",
            {"msgtype": "m.text", "body": "from the ghost"},
        )
        assert status == 200, answer
        # The bridge has had those events (sent before this command's) and answers commands.
        dm = await open_dm(alice)
        await asyncio.sleep(2)  # the bot's welcome in the DM first
        assert "help" in (await command(alice, dm, "!kalandra help")).lower()
        await asyncio.sleep(3)  # what the bridge would do about the room runs in the background
        assert await _bot_membership(alice, room) != "join"
        from_bot = [e for e in await room_history(alice, room) if e.sender == BOT]
        assert from_bot == []
