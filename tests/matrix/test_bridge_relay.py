"""Relay mode and visible failures against a real Synapse: a Matrix user with only the `relay`
permission is refused (a failure status event and a notice saying what is missing) while the
portal does not relay, and speaks through the bot's leaf, named by the relay format, once it
does; a message kind the bridge cannot carry (a server notice) fails the same visible way; a
bridged message gets a success status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from helpers.markers import marker_to_native
from helpers.native import next_from_others
from nio import AsyncClient, RoomSendResponse, UnknownEvent

from matrix.bridge_stack import (
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    say,
    sync_until,
)

STATUS = "com.beeper.message_send_status"
WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("relay"),
        "sqlite",
        others=("relay",),
        bridge_options={"relay.enabled": True, "message_status_success": True},
    ) as stack:
        yield stack


async def statuses(client: AsyncClient, room_id: str) -> dict[str, dict[str, Any]]:
    """The bridge's message status events in the room, by the event they are about."""
    found = {}
    for event in await room_history(client, room_id):
        if isinstance(event, UnknownEvent) and event.type == STATUS:
            content = event.source["content"]
            if content.get("status") != "PENDING":  # (a slow queue shows one first)
                found[content["m.relates_to"]["event_id"]] = content
    return found


async def wait_status(client: AsyncClient, room_id: str, event_id: str) -> dict[str, Any]:
    async with asyncio.timeout(WITHIN):
        while (status := (await statuses(client, room_id)).get(event_id)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return status


@pytest.mark.asyncio(loop_scope="module")
async def test_relay_off_then_on_and_unsupported_content(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.others["relay"]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "relay")
        room = bytes.fromhex(room_hex)
        await bob.set_displayname("Bob Relay")
        await alice.room_invite(portal, bob.user_id)
        await bob.join(portal)
        await sync_until(bob, lambda: portal in bob.rooms, "the join")

        # A bridged user's message: success status.
        ok = await say(alice, portal, "from a bridged user")
        assert (await next_from_others(native)).content.body == "from a bridged user"
        assert (await wait_status(alice, portal, ok))["status"] == "SUCCESS"

        # Relaying is off: refused, visibly.
        notices = bot_notices(bob, portal)
        refused = await say(bob, portal, "hello from relay")
        status = await wait_status(bob, portal, refused)
        assert status["status"] == "FAIL_PERMANENT"
        assert status["reason"] == "m.no_permission"
        await sync_until(bob, lambda: bool(notices), "the refusal notice")
        assert "`user` permission" in notices[0]
        assert "relaying" in notices[0]

        # Not supported: a server notice.
        unsupported = await bob.room_send(
            portal,
            "m.room.message",
            {"msgtype": "m.server_notice", "body": "maintenance tonight"},
        )
        assert isinstance(unsupported, RoomSendResponse), unsupported
        status = await wait_status(bob, portal, unsupported.event_id)
        assert status["status"] == "FAIL_PERMANENT"
        assert status["reason"] == "com.beeper.unsupported_event"
        await sync_until(bob, lambda: len(notices) >= 2, "the unsupported notice")
        assert "m.server_notice is not supported" in notices[1]

        # Relaying on (an admin's command in the portal): through the bot's leaf, named by the
        # relay format.
        answer = await command(alice, portal, "!kalandra set-relay")
        assert answer.startswith("Relay mode is on"), answer
        relayed = await say(bob, portal, "hello again")
        message = await next_from_others(native)
        assert message.content.body == "Bob Relay: hello again"
        assert (await wait_status(bob, portal, relayed))["status"] == "SUCCESS"
        bridged = await say(alice, portal, "and a bridged one")
        assert (await next_from_others(native)).content.body == "and a bridged one"
        assert (await wait_status(alice, portal, bridged))["status"] == "SUCCESS"

        # Relaying off again: refused again.
        answer = await command(alice, portal, "!kalandra unset-relay")
        assert answer == "Relay mode is off in this portal.", answer
        again = await say(bob, portal, "one more from relay")
        assert (await wait_status(bob, portal, again))["reason"] == "m.no_permission"
        await sync_until(bob, lambda: len(notices) >= 3, "the third refusal notice")

        # Neither the refused messages nor the notices reached Kalandra, nothing came twice:
        # not before a marker of alice's, which the portal's queue toward Kalandra handles
        # after every event before it (the notices included: they came before it in Matrix).
        _, late = await marker_to_native(alice, portal, native, room)
        assert late == []
    await native.close()
