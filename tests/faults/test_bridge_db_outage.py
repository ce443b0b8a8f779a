"""The bridge's own database goes away while it bridges a Matrix message to Kalandra (real
Synapse, real PostgreSQL stopped and started again).

The message was sequenced in Kalandra (the native member has it); recording it as bridged then
meets the outage. The bridge used to retry such an "internal error" five times (about eight
seconds), then report the message failed in Matrix (status event and notice) although it had
reached Kalandra, and leave Synapse to resend the transaction. An outage is waited out, however
long: the message is recorded once the database is back, nothing is reported failed and
nothing is sent twice; its sender sees it in progress (PENDING), then bridged (SUCCESS).
``KALANDRA_TEST_RECORD_LAG`` holds the recording back a few seconds so
the outage always starts in that window, without a race.
"""

from __future__ import annotations

import asyncio
import os
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
    room_history,
    say,
)

from kalandra_core.client.events import Message

LAG = "4"  # seconds between the message's sequencing and its record
OUTAGE = 25.0  # seconds: far beyond the bridge's old retry budget for an internal error


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: PrivatePostgres
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_RECORD_LAG")
    os.environ["KALANDRA_TEST_RECORD_LAG"] = LAG  # read by the bridge processes started here
    quiet = {"logging.loggers.asyncpg": {"level": "ERROR"}}  # its reconnect tracebacks
    try:
        async with bridge_stack(
            tmp_path_factory.mktemp("dboutage"),
            "postgres",
            options=quiet,
            pg_admin=postgres.admin_dsn,
        ) as stack:
            yield stack
    finally:
        if not postgres.running():
            await asyncio.to_thread(postgres.start)
        if before is None:
            del os.environ["KALANDRA_TEST_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_RECORD_LAG"] = before


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="module")
async def test_database_outage_while_recording_a_message_neither_fails_nor_doubles_it(
    stack: BridgeStack, postgres: PrivatePostgres
) -> None:
    native = await native_client(stack)
    got: list[Message] = []
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "database outage")
        room = bytes.fromhex(room_hex)
        await alice.sync(timeout=0)
        notices = bot_notices(alice, portal)
        first = await say(alice, portal, "sequenced, then the database goes")
        async with asyncio.timeout(60):
            await messages_from_others(native, got, 1, room)
        await asyncio.to_thread(postgres.stop)  # within the record lag
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(postgres.start)
        await say(alice, portal, "after the outage")
        async with asyncio.timeout(180):
            await messages_from_others(native, got, 2, room)
        await say(alice, portal, "last")  # anything sent twice arrives before it
        async with asyncio.timeout(60):
            await messages_from_others(native, got, 3, room)
        await alice.sync(timeout=0)
        # The wait showed as in progress (PENDING), then one SUCCESS: the outcome, although
        # bridge.message_status_success is off.
        statuses = [
            e.source["content"]["status"]
            for e in await room_history(alice, portal)
            if e.source.get("type") == "com.beeper.message_send_status"
            and e.source["content"]["m.relates_to"]["event_id"] == first
        ]
        assert statuses == ["PENDING", "SUCCESS"], statuses
    await native.close()
    assert [m.content.body for m in got] == [
        "sequenced, then the database goes",
        "after the outage",
        "last",
    ]
    assert not notices, notices  # nothing was reported failed
