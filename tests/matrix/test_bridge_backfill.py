"""History into new portals, against a real Synapse: a native member's room, with the bot in it
but no portal, gets 1,000 messages (and one that is redacted before the portal exists); the
portal opened afterwards shows all 1,000, once each, in log order, with each message's original
time as its origin_server_ts, progress notices, and live messages after them. A backfill cut
by kill -9 resumes after a restart without sending anything twice. An image in the history
arrives as an m.image with its file and info.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers.matrix import next_in_room, text_of
from nio import AsyncClient, RoomMessageNotice, RoomMessageText

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message
from matrix.bridge_members import account_id, native_room, open_portal
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    ghost_of,
    ghost_texts,
    native_client,
    nio_client,
    room_history,
)
from matrix.test_bridge_epochs import BOT_NAME
from matrix.test_bridge_media import download, png

COUNT = 1000
INTERVAL = 250  # example-config.yaml's bridge.backfill.progress_interval


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("backfill")) as stack:
        yield stack


async def send_many(native: Client, room_id: bytes, bodies: list[str]) -> list[Message]:
    """Send ``bodies`` in order (a few in flight at a time); the sender's own echoes of them,
    in log order."""
    for start in range(0, len(bodies), 50):
        await asyncio.gather(*(native.send_text(room_id, b) for b in bodies[start : start + 50]))
    echoes: list[Message] = []
    async with asyncio.timeout(120):
        while len(echoes) < len(bodies):
            message = await native.messages.get()
            if message.room_id == room_id and message.sender_id == native.core.member_id:
                echoes.append(message)
    return sorted(echoes, key=lambda m: m.log_index)


async def wait_texts(
    alice: AsyncClient, portal: str, ghost: str, count: int, within: float = 240.0
) -> list[RoomMessageText]:
    async with asyncio.timeout(within):
        while len(seen := await ghost_texts(alice, portal, ghost)) < count:  # noqa: ASYNC110
            await asyncio.sleep(1.0)
    return seen


async def until_text(alice: AsyncClient, portal: str, ghost: str, body: str) -> None:
    """Until ``alice`` sees the ghost's text ``body`` (sent after her last sync)."""
    await next_in_room(alice, portal, lambda e: text_of(e, ghost) == body, repr(body), 240)


def as_sent(texts: list[RoomMessageText]) -> list[tuple[int, str, int]]:
    """(log index, body, origin_server_ts) of each bridged message."""
    return [
        (e.source["content"]["org.kalandra.log_index"], e.body, e.server_timestamp) for e in texts
    ]


@pytest.mark.asyncio(loop_scope="module")
async def test_history_of_1000_messages_arrives_complete_and_in_order(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history")
    bodies = [f"history {i}" for i in range(COUNT)]
    echoes = await send_many(owner, room_id, [*bodies[:500], "to be redacted", *bodies[500:]])
    redacted = next(m for m in echoes if m.content.body == "to be redacted")
    await owner.moderate(room_id, "redact", redacted.log_index, "")
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in echoes if m != redacted]
    assert [body for _, body, _ in expected] == bodies

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        # A live message at once: the backfill is at the head of the portal's queue toward
        # Matrix, so it comes after the whole history, and nothing of the history (no
        # duplicate, no redacted message) comes after it.
        index = await owner.send_text(room_id, "live")
        await until_text(alice, portal, ghost_of(owner), "live")
        *texts, live = await ghost_texts(alice, portal, ghost_of(owner))
        assert as_sent(texts) == expected
        assert (live.body, live.source["content"]["org.kalandra.log_index"]) == ("live", index)

        notices = [
            e.body
            for e in await room_history(alice, portal)
            if isinstance(e, RoomMessageNotice) and e.sender == BOT
        ]
        progress = [f"History: {n} of {COUNT} earlier messages bridged." for n in (250, 500, 750)]
        assert notices == [*progress, f"History: all {COUNT} earlier messages bridged."]
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_backfill_cut_by_kill9_resumes_without_duplicates(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history cut")
    count = 300
    echoes = await send_many(owner, room_id, [f"cut {i}" for i in range(count)])
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in echoes]

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await wait_texts(alice, portal, ghost_of(owner), 40, within=120)
        await stack.kill9()
        await stack.restart()
        await owner.wait_connected()
        # A live message after the restart: the resumed backfill goes before it, so a resent
        # message would show before it.
        await owner.send_text(room_id, "live")
        await until_text(alice, portal, ghost_of(owner), "live")
        *texts, live = await ghost_texts(alice, portal, ghost_of(owner))
        assert as_sent(texts) == expected
        assert live.body == "live"
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_an_image_in_the_history_arrives_with_its_file(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history with media")
    image = png(40, 30)
    ref = await owner.upload_media(
        room_id, image, mimetype="image/png", name="old.png", kind="image"
    )
    await owner.send(room_id, Content(body="old.png", kind="image", media=ref))
    await send_many(owner, room_id, ["after the image"])
    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        texts = await wait_texts(alice, portal, ghost_of(owner), 1, within=60)
        assert [t.body for t in texts] == ["after the image"]
        images = [
            e.source
            for e in await room_history(alice, portal)
            if e.source.get("sender") == ghost_of(owner)
            and e.source["content"].get("msgtype") == "m.image"
        ]
        assert len(images) == 1, images
        content = images[0]["content"]
        assert content["body"] == "old.png"
        assert content["info"] == {"mimetype": "image/png", "size": len(image), "w": 40, "h": 30}
        assert await download(alice, content["url"]) == image
        # Before the text, in log order, at its original time.
        assert images[0]["origin_server_ts"] <= texts[0].server_timestamp
        assert (
            content["org.kalandra.log_index"]
            < texts[0].source["content"]["org.kalandra.log_index"]
        )
    await owner.close()
