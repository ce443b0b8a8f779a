"""Durability both ways against a real Synapse: a Matrix user and a native member each send 500
messages into one portal while the bridge is killed with SIGKILL in the middle of the flow and
restarted. Afterwards each side has every message of the other exactly once, in order: the
native member as Kalandra messages from the Matrix user's puppet leaf (appservice transactions
are acknowledged only once their events are sequenced and recorded, and a replayed event
resends its recorded frame), the Matrix user as the ghost's events. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix, marker_to_native
from helpers.matrix import send_numbered

from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    ghost_texts,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
)

COUNT = 500
KILL_AFTER = 60  # messages seen on each side before the kill
# Seconds for everything to arrive on a loaded 2-core machine (shorter to chase a stall).
WITHIN = float(os.environ.get("KALANDRA_TEST_WITHIN", "600"))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("durability"), request.param) as stack:
        yield stack


@pytest.mark.asyncio(loop_scope="module")
async def test_kill9_while_messages_flow_both_ways(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "durability")
        room = bytes.fromhex(room_hex)
        ghost = ghost_of(native)

        received: list[Message] = []
        receiving = asyncio.create_task(messages_from_others(native, received, COUNT))
        # Synapse takes the user's messages whether the bridge is up or not.
        sending = asyncio.create_task(send_numbered(alice, portal, COUNT))
        for i in range(COUNT):  # the embedded server takes them fast; the bridge lags behind
            await native.send_text(room, f"native {i}")

        # Kill while both directions are under way.
        async with asyncio.timeout(WITHIN):
            while (  # noqa: ASYNC110
                len(received) < KILL_AFTER
                or len(await ghost_texts(alice, portal, ghost)) < KILL_AFTER
            ):
                await asyncio.sleep(0.5)
        assert len(received) < COUNT, "the Matrix user's messages all arrived before the kill"
        await stack.kill9()
        await stack.restart()
        await native.wait_connected()

        try:
            async with asyncio.timeout(WITHIN):
                await sending
                await receiving
                # The native member's marker: Matrix shows it once every native message
                # before it is there (the portal's queue toward Matrix is in log order).
                marker = await marker_to_matrix(native, room, alice, portal, ghost, WITHIN)
        except TimeoutError:
            got = len(received), len(await ghost_texts(alice, portal, ghost))
            mine = native.core.rooms[room]
            bodies = {m.content.body for m in received}
            missing = [i for i in range(COUNT) if f"matrix {i}" not in bodies]
            others = []
            while not native.events.empty():
                others.append(repr(native.events.get_nowait())[:200])
            synapse_log = stack.synapse.log_path.read_text(errors="replace").splitlines()
            appservice = [line for line in synapse_log if "ppservice" in line][-40:]
            raise AssertionError(
                f"stalled after the restart (native got {got[0]}, Matrix got {got[1]} of {COUNT})"
                f"; missing on the native side: {missing[:10]}"
                f"; native room: last_seen={mine.last_seen} syncing={mine.syncing}"
                f" ahead={sorted(mine.ahead)[:5]} connected={native.core.connected}"
                f"\nSynapse on appservices:\n"
                + "\n".join(appservice)
                + "\nnative client events:\n"
                + "\n".join(others[-30:])
                + f"\nthe bridge's tasks:\n{await stack.task_dump()}"
            ) from None
        # Nothing more (no duplicate) arrives on either side: the Matrix user's marker goes
        # behind its messages through the portal's queue toward Kalandra (a replayed
        # transaction is handled before a later one), and the native one's came last.
        _, late = await marker_to_native(alice, portal, native, room, WITHIN)
        seen = await ghost_texts(alice, portal, ghost)
        assert seen[-1].body == marker
        seen = seen[:-1]

        assert [e.body for e in seen] == [f"native {i}" for i in range(COUNT)]
        assert len({e.event_id for e in seen}) == COUNT
        assert late == []
        assert [m.content.body for m in received] == [f"matrix {i}" for i in range(COUNT)]
        assert len({m.sender_id for m in received}) == 1
        assert [m.log_index for m in received] == sorted({m.log_index for m in received})
    await native.close()
