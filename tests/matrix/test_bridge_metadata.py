"""Room name and topic both ways, against a real Synapse: a native member's change shows in the
portal (sent by the bot while the member's ghost lacks the power, by the ghost once the room
gives it), a Matrix user's change reaches native members as the room's new name and topic
(from the user's own Kalandra member), nothing bounces back, and a portal opened after a change
starts with the changed name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from nio import AsyncClient, RoomGetStateEventResponse, RoomNameEvent, RoomTopicEvent

from kalandra_core.client.driver import Client
from kalandra_core.client.events import RoomMetaChanged
from kalandra_core.client.room_meta import RoomMeta, meta_content
from matrix.bridge_members import account_id, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
)
from matrix.test_bridge_epochs import BOT_NAME, bridged_member


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("metadata")) as stack:
        yield stack


async def meta_events(client: AsyncClient, room_id: str) -> list[tuple[str, str, str]]:
    """(type, value, sender) of the room's name and topic events, oldest first."""
    out = []
    for event in await room_history(client, room_id):
        if isinstance(event, RoomNameEvent):
            out.append(("name", event.name, event.sender))
        elif isinstance(event, RoomTopicEvent):
            out.append(("topic", event.topic, event.sender))
    return out


async def wait_meta_event(
    client: AsyncClient, room_id: str, wanted: tuple[str, str]
) -> tuple[str, str, str]:
    async def check() -> tuple[str, str, str] | None:
        found = [e for e in await meta_events(client, room_id) if e[:2] == wanted]
        return found[-1] if found else None

    result: tuple[str, str, str] = await wait_until(check, f"the {wanted[0]} {wanted[1]!r}")
    return result


async def next_meta(native: Client, room_id: bytes, within: float = 60.0) -> RoomMetaChanged:
    async with asyncio.timeout(within):
        while True:
            event = await native.events.get()
            if isinstance(event, RoomMetaChanged) and event.room_id == room_id:
                return event


async def state_of(client: AsyncClient, room_id: str, event_type: str) -> dict[str, Any]:
    response = await client.room_get_state_event(room_id, event_type, "")
    assert isinstance(response, RoomGetStateEventResponse), response
    return response.content


@pytest.mark.asyncio(loop_scope="module")
async def test_native_changes_show_in_the_portal(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "before")
        room_id = bytes.fromhex(room_hex)
        ghost = ghost_of(native)

        # The ghost has power level 0 and names need 50: the bot sends the change.
        await native.send(room_id, meta_content(RoomMeta(name="Renamed natively")))
        assert await wait_meta_event(alice, portal, ("name", "Renamed natively")) == (
            "name",
            "Renamed natively",
            BOT,
        )
        # Given the power, the ghost sends it itself.
        levels = await state_of(alice, portal, "m.room.power_levels")
        levels["users"][ghost] = 50
        await alice.room_put_state(portal, "m.room.power_levels", levels)
        await native.send(room_id, meta_content(RoomMeta(topic="A native topic")))
        assert await wait_meta_event(alice, portal, ("topic", "A native topic")) == (
            "topic",
            "A native topic",
            ghost,
        )
        assert native.core.rooms[room_id].name == "Renamed natively"
        assert native.core.rooms[room_id].topic == "A native topic"
        await asyncio.sleep(2)
        # Each change once (a bounce through Kalandra would show as a second event).
        assert await meta_events(alice, portal) == [
            ("name", "before", BOT),
            ("name", "Renamed natively", BOT),
            ("topic", "A native topic", ghost),
        ]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_changes_reach_native_members(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "from matrix")
        room_id = bytes.fromhex(room_hex)
        await alice.room_put_state(portal, "m.room.name", {"name": "Named in Matrix"})
        changed = await next_meta(native, room_id)
        puppet = await bridged_member(stack, alice.user_id)
        assert (changed.sender_id, changed.name, changed.changed) == (
            puppet,
            "Named in Matrix",
            ("name",),
        )
        await alice.room_put_state(portal, "m.room.topic", {"topic": "Topic from Matrix"})
        changed = await next_meta(native, room_id)
        assert (changed.name, changed.topic, changed.changed) == (
            "Named in Matrix",
            "Topic from Matrix",
            ("topic",),
        )
        assert native.core.rooms[room_id].name == "Named in Matrix"
        await asyncio.sleep(2)
        # No echo: the portal's name and topic events are alice's only, once each.
        assert await meta_events(alice, portal) == [
            ("name", "from matrix", BOT),
            ("name", "Named in Matrix", alice.user_id),
            ("topic", "Topic from Matrix", alice.user_id),
        ]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_new_portal_starts_with_the_latest_name(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "created name")
    await owner.send(room_id, meta_content(RoomMeta(name="Changed before the portal")))
    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        content = await state_of(alice, portal, "m.room.name")
        assert content.get("name") == "Changed before the portal"
    await owner.close()
