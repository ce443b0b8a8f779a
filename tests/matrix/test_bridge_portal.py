"""Portals against a real Synapse, on SQLite and on PostgreSQL: `!kalandra create`, a native
member added by the bot, its messages arriving in Matrix from its ghost in order and exactly
once, across a kill -9 of the bridge in the middle of a batch.

The native user is a `kalandra_core` Client over TCP to the bridge's embedded server, its
account made in the bridge's database by the test (a second SqlStore on the same database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix

from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_history,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
    wait_history,
)

BATCH = 20


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("portal"), request.param) as stack:
        yield stack


@pytest.mark.asyncio(loop_scope="module")
async def test_native_messages_reach_matrix_once_in_order_across_kill9(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "test")
        assert alice.rooms[portal].name == "test"
        ghost = ghost_of(native)

        room_id = bytes.fromhex(room_hex)
        for i in range(BATCH):
            await native.send_text(room_id, f"message {i}")
        # Kill -9 while the batch is still flowing toward Matrix (the bridge has all of it
        # in the Kalandra log; Synapse has only part of it).
        await wait_history(alice, portal, ghost, 3)

        await stack.kill9()
        await stack.restart()
        await native.wait_connected()
        for i in range(BATCH, 2 * BATCH):
            await native.send_text(room_id, f"message {i}")
        # Nothing more (no duplicate) arrives: a last message goes behind the batch through
        # the portal's queue toward Matrix (in log order, a resent message before later ones).
        marker = await marker_to_matrix(native, room_id, alice, portal, ghost)
        seen = await ghost_history(alice, portal, ghost)

        assert [body for _, body in seen] == [f"message {i}" for i in range(2 * BATCH)] + [marker]
        assert len({event_id for event_id, _ in seen}) == 2 * BATCH + 1
    await native.close()
