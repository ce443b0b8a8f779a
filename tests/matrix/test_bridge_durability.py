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
from nio import AsyncClient, RoomSendResponse

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


async def matrix_sender(alice: AsyncClient, portal: str) -> None:
    """Synapse takes the user's messages whether the bridge is up or not."""
    for i in range(COUNT):
        sent = await alice.room_send(
            portal, "m.room.message", {"msgtype": "m.text", "body": f"matrix {i}"}
        )
        assert isinstance(sent, RoomSendResponse), sent


@pytest.mark.asyncio(loop_scope="module")
async def test_kill9_while_messages_flow_both_ways(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "durability")
        room = bytes.fromhex(room_hex)
        ghost = ghost_of(native)

        received: list[Message] = []
        receiving = asyncio.create_task(messages_from_others(native, received, COUNT))
        sending = asyncio.create_task(matrix_sender(alice, portal))
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
                while len(await ghost_texts(alice, portal, ghost)) < COUNT:  # noqa: ASYNC110
                    await asyncio.sleep(1.0)
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
        # A quiet spell: nothing more (no duplicate) arrives on either side.
        await asyncio.sleep(3)
        seen = await ghost_texts(alice, portal, ghost)
        late = []
        while not native.messages.empty():
            if (message := native.messages.get_nowait()).sender_id != native.core.member_id:
                late.append(message)

        assert [e.body for e in seen] == [f"native {i}" for i in range(COUNT)]
        assert len({e.event_id for e in seen}) == COUNT
        assert late == []
        assert [m.content.body for m in received] == [f"matrix {i}" for i in range(COUNT)]
        assert len({m.sender_id for m in received}) == 1
        assert [m.log_index for m in received] == sorted({m.log_index for m in received})
    await native.close()
