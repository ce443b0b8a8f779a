"""Matrix -> Kalandra against a real Synapse: a Matrix user with the `user` permission speaks
in a portal; the bridge makes them a Kalandra member (a puppet leaf the bot adds), and the
native member receives every message, in order, once, from that member, with its formatting;
nothing comes back to Matrix from a ghost.
"""

from __future__ import annotations

import pytest
from helpers.markers import marker_to_matrix, marker_to_native
from nio import AsyncClient, RoomSendResponse

from matrix.bridge_stack import (
    BridgeStack,
    ghost_history,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
)
from matrix.test_bridge_portal import stack  # noqa: F401 - this module's fixture too

COUNT = 20
FORMATTED = 7


async def send(client: AsyncClient, room_id: str, i: int) -> None:
    content = {"msgtype": "m.text", "body": f"matrix {i}"}
    if i == FORMATTED:
        content |= {"format": "org.matrix.custom.html", "formatted_body": f"<b>matrix {i}</b>"}
    sent = await client.room_send(room_id, "m.room.message", content)
    assert isinstance(sent, RoomSendResponse), sent


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_messages_reach_native_once_in_order(
    stack: BridgeStack,  # noqa: F811
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "m2k")

        for i in range(COUNT):
            await send(alice, portal, i)

        # Everything before a marker that goes the same way (the portal's queue toward
        # Kalandra handles the room's events in order): nothing more (no duplicate) came.
        room = bytes.fromhex(room_hex)
        _, received = await marker_to_native(alice, portal, native, room)

        assert [m.content.body for m in received] == [f"matrix {i}" for i in range(COUNT)]
        senders = {m.sender_id for m in received}
        assert len(senders) == 1
        (puppet,) = senders
        assert puppet != native.core.member_id
        assert received[FORMATTED].content.formatted_body == f"<b>matrix {FORMATTED}</b>"
        plain = [m for i, m in enumerate(received) if i != FORMATTED]
        assert all(m.content.formatted_body is None for m in plain)
        assert len({m.log_index for m in received}) == COUNT

        # The Kalandra echo of the puppet's messages does not come back from a ghost: not
        # before a marker of the native member's that follows them in the log.
        await marker_to_matrix(native, room, alice, portal, ghost_of(native))
        assert await ghost_history(alice, portal, f"@kalandra_{puppet}:localhost") == []
    await native.close()
