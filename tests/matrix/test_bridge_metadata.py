"""Room name, topic and avatar both ways, against a real Synapse: a native member's change
shows in the portal (sent by the bot while the member's ghost lacks the power, by the ghost once
the room gives it), a Matrix user's change reaches native members as the room's new name and
topic (from the user's own Kalandra member), nothing bounces back, and a portal opened after a
change starts with the changed name and avatar. An avatar arrives as the exact image bytes
either way, and its removal too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix, marker_to_native
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
from matrix.test_bridge_media import download, png, upload


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


async def bounced(alice: AsyncClient, portal: str, native: Client, room_id: bytes) -> list[str]:
    """A marker each way, so that whatever the bridge would send back has shown on both sides
    (the portal's queues keep the order): the fields of the room changes that reached
    ``native`` from others before alice's marker."""
    marker, _ = await marker_to_native(alice, portal, native, room_id)
    await marker_to_matrix(native, room_id, alice, portal, ghost_of(native))
    changes: list[str] = []
    while not native.events.empty():
        event = native.events.get_nowait()
        if (
            isinstance(event, RoomMetaChanged)
            and event.room_id == room_id
            and event.sender_id != native.core.member_id
            and event.log_index < marker.log_index
        ):
            changes.extend(event.changed)
    return changes


async def state_of(client: AsyncClient, room_id: str, event_type: str) -> dict[str, Any]:
    response = await client.room_get_state_event(room_id, event_type, "")
    assert isinstance(response, RoomGetStateEventResponse), response
    content: dict[str, Any] = response.content
    return content


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
        # Each change once: nothing bounced back to Kalandra, and nothing shows twice in
        # Matrix. The name given at creation came before Alice's invitation: history
        # visibility `invited` keeps it out of her timeline.
        assert await bounced(alice, portal, native, room_id) == []
        assert await meta_events(alice, portal) == [
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
        # No echo: the portal's name and topic events are alice's only, once each (the name
        # given at creation came before her invitation, outside her `invited` history), when
        # a later message of the native member's is there (the portal's queue toward Matrix
        # mirrors the log in order).
        await marker_to_matrix(native, room_id, alice, portal, ghost_of(native))
        assert await meta_events(alice, portal) == [
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


@pytest.mark.asyncio(loop_scope="module")
async def test_a_new_portal_starts_with_the_latest_avatar(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "avatar before the portal")
    image = png(24, 16)
    ref = await owner.upload_media(
        room_id, image, mimetype="image/png", name="early.png", kind="image", width=24, height=16
    )
    await owner.send(room_id, meta_content(RoomMeta(avatar=ref)))
    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        content = await state_of(alice, portal, "m.room.avatar")
        assert content["info"] == {"mimetype": "image/png", "size": len(image), "w": 24, "h": 16}
        assert await download(alice, content["url"]) == image
    await owner.close()


async def avatar_events(client: AsyncClient, room_id: str) -> list[tuple[dict[str, Any], str]]:
    """(content, sender) of the room's m.room.avatar events, oldest first."""
    return [
        (event.source.get("content", {}), event.source["sender"])
        for event in await room_history(client, room_id)
        if event.source.get("type") == "m.room.avatar"
    ]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_native_avatar_shows_in_the_portal(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "avatar natively")
        room_id = bytes.fromhex(room_hex)
        image = png(48, 32)
        ref = await native.upload_media(
            room_id,
            image,
            mimetype="image/png",
            name="logo.png",
            kind="image",
            width=48,
            height=32,
        )
        await native.send(room_id, meta_content(RoomMeta(avatar=ref)))

        async def shown() -> dict[str, Any] | None:
            found = await avatar_events(alice, portal)
            return found[-1][0] if found and found[-1][0].get("url") else None

        content = await wait_until(shown, "the avatar in the portal")
        # The exact bytes, with their info; the bot sends it (the ghost lacks the power).
        assert await download(alice, content["url"]) == image
        assert content["info"] == {"mimetype": "image/png", "size": len(image), "w": 48, "h": 32}
        assert native.core.rooms[room_id].avatar == ref

        await native.send(room_id, meta_content(RoomMeta(remove_avatar=True)))

        async def removed() -> bool:
            found = await avatar_events(alice, portal)
            return len(found) == 2 and not found[-1][0].get("url")

        await wait_until(removed, "the avatar removed")
        # Each change once, by the bot: nothing came back from Matrix as a second change.
        assert await bounced(alice, portal, native, room_id) == []
        assert [sender for _, sender in await avatar_events(alice, portal)] == [BOT, BOT]
        assert native.core.rooms[room_id].avatar is None
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_matrix_avatar_reaches_native_members(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "avatar from matrix")
        room_id = bytes.fromhex(room_hex)
        image = png(20, 30)
        uri = await upload(alice, image, "image/png", "face.png")
        await alice.room_put_state(
            portal, "m.room.avatar", {"url": uri, "info": {"mimetype": "image/png"}}
        )
        changed = await next_meta(native, room_id)
        puppet = await bridged_member(stack, alice.user_id)
        assert (changed.sender_id, changed.changed) == (puppet, ("avatar",))
        assert changed.avatar is not None
        assert (changed.avatar.kind, changed.avatar.mimetype) == ("image", "image/png")
        assert await native.download_media(room_id, changed.avatar) == image
        assert native.core.rooms[room_id].avatar == changed.avatar

        await alice.room_put_state(portal, "m.room.avatar", {})
        changed = await next_meta(native, room_id)
        assert (changed.sender_id, changed.changed, changed.avatar) == (puppet, ("avatar",), None)
        # No echo: the portal's avatar events are alice's two, when a later message of the
        # native member's is there.
        await marker_to_matrix(native, room_id, alice, portal, ghost_of(native))
        assert [sender for _, sender in await avatar_events(alice, portal)] == [
            alice.user_id,
            alice.user_id,
        ]
    await native.close()
