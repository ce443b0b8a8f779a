"""A kill -9 of the bridge while a relayed message is in flight, against a real Synapse (SQLite
and PostgreSQL).

A `relay` user's message goes out through the bot's own leaf. Before the fix nothing tied the
Matrix event to the bot's request: a crash after the message was sequenced and before the event
was recorded as bridged (Synapse then sends the event again) made the restarted bridge send a
second, new message, and the native member saw it twice. The bridge runs here with
``KALANDRA_TEST_RECORD_LAG`` (a sequenced message is recorded seconds late), so the kill always
falls inside that window, without a race.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    command,
    native_client,
    nio_client,
    portal_with_native,
    say,
    sync_until,
)

from kalandra_core.client.driver import Client

LAG = "6"  # seconds: longer than the relayed message takes to reach the native member


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_RECORD_LAG")
    os.environ["KALANDRA_TEST_RECORD_LAG"] = LAG  # read by the bridge processes started here
    try:
        async with bridge_stack(
            tmp_path_factory.mktemp("relayrestart"),
            request.param,
            others=("relay",),
            bridge_options={"relay.enabled": True},
        ) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_RECORD_LAG"] = before


async def relayed(native: Client, room: bytes, seen: list[str], body: str) -> None:
    """Collect the relayed texts of ``room`` into ``seen`` until one ends with ``body``."""
    async with asyncio.timeout(60):
        while not any(text.endswith(body) for text in seen):
            message = await native.messages.get()
            if message.room_id == room and "relayed" in message.content.body:
                seen.append(message.content.body)


@pytest.mark.asyncio(loop_scope="module")
async def test_kill9_while_a_relayed_message_is_sent_delivers_it_once(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    seen: list[str] = []
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.others["relay"]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "relay then kill")
        room = bytes.fromhex(room_hex)
        await alice.room_invite(portal, bob.user_id)
        await bob.join(portal)
        await sync_until(bob, lambda: portal in bob.rooms, "the join")
        answer = await command(alice, portal, "!kalandra set-relay")
        assert answer.startswith("Relay mode is on"), answer

        await say(bob, portal, "relayed before the kill")
        # Sequenced (the native member has it); the bridge records it LAG seconds later.
        await relayed(native, room, seen, "relayed before the kill")
        await stack.kill9()
        await stack.restart()

        await say(bob, portal, "relayed after the restart")
        await relayed(native, room, seen, "relayed after the restart")
        await say(bob, portal, "relayed last")  # anything doubled late arrives before it
        await relayed(native, room, seen, "relayed last")
    await native.close()
    bodies = [text.split(": ", 1)[-1] for text in seen]
    assert bodies == ["relayed before the kill", "relayed after the restart", "relayed last"], seen
