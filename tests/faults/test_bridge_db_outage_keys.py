"""A room key that reaches the bridge while its database is down is not lost (real Synapse, a
PostgreSQL server of the test's own, an encrypted portal, a matrix-nio client with E2EE).

A new device of the Matrix user sends its first message into the portal while PostgreSQL is
stopped: the room key comes as a to-device event in the same appservice transaction. mautrix
logged the failure to store it and went on; Synapse retries a failed transaction with its room
events only, so the key was gone, the message failed as undecryptable and waited for a key
request (this device does not answer them). The key is now stored once the database is back,
and the message is bridged, with no failure reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from faults.private_postgres import PrivatePostgres
from matrix.bridge_stack import (
    BridgeStack,
    bot_notices,
    bridge_stack,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    say,
    sync_until,
)

from kalandra_core.client.events import Message

OUTAGE = 15.0  # seconds


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: PrivatePostgres
) -> AsyncIterator[BridgeStack]:
    quiet = {"logging.loggers.asyncpg": {"level": "ERROR"}}  # its reconnect tracebacks
    try:
        async with bridge_stack(
            tmp_path_factory.mktemp("dboutagekeys"),
            "postgres",
            bridge_options={"encryption.allow": True, "encryption.default": True},
            options=quiet,
            pg_admin=postgres.admin_dsn,
        ) as stack:
            yield stack
    finally:
        if not postgres.running():
            await asyncio.to_thread(postgres.start)


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="module")
async def test_a_room_key_that_arrives_while_the_database_is_down_is_kept(
    stack: BridgeStack, postgres: PrivatePostgres
) -> None:
    native = await native_client(stack)
    got: list[Message] = []
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "keys in an outage")
        room = bytes.fromhex(room_hex)
        await say(alice, portal, "before")
        async with asyncio.timeout(60):
            await messages_from_others(native, got, 1, room)
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            await phone.sync(timeout=0)
            notices = bot_notices(phone, portal)
            await asyncio.to_thread(postgres.stop)
            try:
                # A new Megolm session: its key goes to the bridge's device with the message.
                await say(phone, portal, "from a new device, in the outage")
                await asyncio.sleep(OUTAGE)
            finally:
                await asyncio.to_thread(postgres.start)
            async with asyncio.timeout(120):
                await messages_from_others(native, got, 2, room)
            await say(phone, portal, "after")
            async with asyncio.timeout(60):
                await messages_from_others(native, got, 3, room)
            await phone.sync(timeout=0)
    await native.close()
    assert [m.content.body for m in got] == ["before", "from a new device, in the outage", "after"]
    assert not notices, notices  # nothing was reported undecryptable
