"""A native message that reached Matrix, then both the bridge and Synapse restarted before the
bridge recorded it (real Synapse, SQLite and PostgreSQL).

Synapse keeps the transaction ids of appservice users in memory only: once it has restarted,
the same transaction id makes a second event. The bridge sends up to a pipeline of messages
ahead of recording them, so after its own restart any of those may be in the room already; it
must look for them before sending them again. Found by the soak (a kill -9 of Synapse, then of
the bridge, a message doubled in Matrix). ``KALANDRA_TEST_MATRIX_RECORD_LAG`` holds each record
back a few seconds, so the kills always fall between the send and its record.

The same for a message the homeserver refuses for good (an image whose caption passes Synapse's
event size limit): its set-aside notice reached Matrix, not its record; after both restarts the
message is refused again, and the notice already in the room stands for it, not a second one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from faults.test_backfill_set_aside import aside_notices, assert_the_notice, oversized_image
from helpers.sql import query
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    ghost_texts,
    native_client,
    nio_client,
    portal_with_native,
)

LAG = "8"  # seconds between a message reaching Matrix and its record
WITHIN = 120.0


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_MATRIX_RECORD_LAG")
    os.environ["KALANDRA_TEST_MATRIX_RECORD_LAG"] = LAG  # read by the bridges started here
    try:
        async with bridge_stack(tmp_path_factory.mktemp("ghostsend"), request.param) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_MATRIX_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_MATRIX_RECORD_LAG"] = before


@pytest.mark.asyncio(loop_scope="module")
async def test_messages_sent_before_both_restarts_are_not_sent_again(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "sent, not recorded")
        room = bytes.fromhex(room_hex)
        ghost = ghost_of(native)
        for n in range(3):
            await native.send_text(room, f"unrecorded {n}")

        async def bodies() -> list[str]:
            return [t.body for t in await ghost_texts(alice, portal, ghost)]

        async with asyncio.timeout(WITHIN):
            while len(await bodies()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        # In Matrix, not yet recorded (the lag): both processes go, Synapse's ids with it.
        await stack.kill9()
        await stack.kill9_synapse()
        await stack.restart()

        await native.send_text(room, "after both restarts")
        async with asyncio.timeout(WITHIN):
            while "after both restarts" not in await bodies():  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        assert await bodies() == [
            "unrecorded 0",
            "unrecorded 1",
            "unrecorded 2",
            "after both restarts",
        ]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_set_aside_notice_sent_before_both_restarts_is_not_sent_again(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "set aside, not recorded")
        room = bytes.fromhex(room_hex)
        ghost = ghost_of(native)
        refused = await oversized_image(native, room)

        async with asyncio.timeout(WITHIN):
            while not await aside_notices(alice, portal):  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        await stack.kill9()
        recorded = await query(
            stack.store_url,
            "SELECT COUNT(*) FROM bridge_messages WHERE room_id = :r AND log_index = :i",
            r=room,
            i=refused,
        )
        assert recorded[0][0] == 0  # the kill fell between the notice and its record
        await stack.kill9_synapse()
        await stack.restart()

        await native.send_text(room, "after the refused one")

        async def after() -> list[str]:
            return [t.body for t in await ghost_texts(alice, portal, ghost)]

        async with asyncio.timeout(WITHIN):
            while "after the refused one" not in await after():  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        notices = await aside_notices(alice, portal)
        assert len(notices) == 1, [n["content"]["body"] for n in notices]
        assert_the_notice(notices[0], ghost, refused)
    await native.close()
