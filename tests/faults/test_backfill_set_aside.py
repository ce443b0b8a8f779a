"""A history message the homeserver refuses for good does not stall the backfill (real Synapse,
real native client, SQLite and PostgreSQL).

The refused message is a real one: an image whose caption makes its Matrix event larger than
Synapse's 64 KiB limit (only plain text is split into parts, see bridge/portal/set_aside.py),
so Synapse answers M_TOO_LARGE however often it is sent. The backfill sets it aside (one notice
from the bot in its place, recorded for its log index) and goes on with the rest, in order.
A bridge killed after the notice was sent and before it was recorded, with Synapse killed as
well (it forgets the appservice's transaction ids), finds the notice again after the restart:
the message is not tried again, nothing is doubled, and the rest of the history follows.
``KALANDRA_TEST_BACKFILL_RECORD_LAG`` holds each batch of records back, so the kill falls
between the notice and its record; the test checks that it did.

A kept history row that can no longer be read (its sealed content damaged in the database)
is set aside the same way, with a notice that says so, instead of stopping the portal.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from helpers.sql import connection, query
from matrix.bridge_members import account_id, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    ghost_texts,
    native_client,
    nio_client,
    room_history,
)
from matrix.synapse import free_port
from matrix.test_bridge_backfill import as_sent, send_many
from matrix.test_bridge_epochs import BOT_NAME
from matrix.test_bridge_media import png
from matrix.test_bridge_metrics import scrape, value
from nio import AsyncClient, RoomMessageNotice

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

LAG = "3"  # seconds each batch of history waits before it is recorded
METRICS_PORT = free_port()
WITHIN = 120.0
REFUSED = "could not be bridged"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_BACKFILL_RECORD_LAG")
    os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"] = LAG  # read by the bridges started here
    try:
        async with bridge_stack(
            tmp_path_factory.mktemp("backfillaside"),
            request.param,
            bridge_options={"backfill.progress_interval": 100},
            options={"metrics.enabled": True, "metrics.listen_port": METRICS_PORT},
        ) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"] = before


async def oversized_image(owner: Client, room_id: bytes) -> int:
    """An image whose caption alone passes Synapse's event size limit; its log index."""
    ref = await owner.upload_media(
        room_id, png(8, 8), mimetype="image/png", name="big.png", kind="image"
    )
    caption = "a very long caption " * 4000  # 80,000 bytes
    index = await owner.send(room_id, Content(body=caption, kind="image", media=ref))
    async with asyncio.timeout(30):  # its echo, which send_many would take for one of its own
        while (await owner.messages.get()).log_index != index:
            pass
    return index


async def kept(stack: BridgeStack, room_id: bytes, log_index: int | None = None) -> int:
    """History rows the bridge still has for the room (or for one log index of it)."""
    sql = "SELECT COUNT(*) FROM bridge_backfill WHERE room_id = :r"
    if log_index is not None:
        sql += f" AND log_index = {int(log_index)}"
    return int((await query(stack.store_url, sql, r=room_id))[0][0])


async def until_kept(stack: BridgeStack, room_id: bytes, count: int) -> None:
    async with asyncio.timeout(60):
        while await kept(stack, room_id) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


async def aside_notices(alice: AsyncClient, portal: str) -> list[dict[str, Any]]:
    """The bot's set-aside notices in the portal, as events."""
    return [
        e.source
        for e in await room_history(alice, portal)
        if isinstance(e, RoomMessageNotice) and e.sender == BOT and REFUSED in e.body
    ]


async def until_live(alice: AsyncClient, portal: str, ghost: str) -> list[Any]:
    async def arrived() -> list[Any] | None:
        texts = await ghost_texts(alice, portal, ghost)
        return texts if texts and texts[-1].body == "live" else None

    texts: list[Any] = await wait_until(arrived, "the live message after the history", WITHIN)
    return texts


async def recorded_event(stack: BridgeStack, room_id: bytes, log_index: int) -> str | None:
    rows = await query(
        stack.store_url,
        "SELECT event_id FROM bridge_messages WHERE room_id = :r AND log_index = :i",
        r=room_id,
        i=log_index,
    )
    return str(rows[0][0]) if rows else None


def aside_lines(stack: BridgeStack, log_index: int) -> int:
    return stack.log.read_text(errors="replace").count(f"(log index {log_index}) set aside")


def assert_the_notice(notice: dict[str, Any], ghost: str, log_index: int) -> None:
    body = notice["content"]["body"]
    for part in (ghost, f"log index {log_index}", "M_TOO_LARGE"):
        assert part in body, body
    marker = notice["content"]["org.kalandra.set_aside"]
    assert marker == {"log_index": log_index, "sender": ghost, "reason": "M_TOO_LARGE"}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_refused_history_message_is_set_aside_and_the_rest_follows(
    stack: BridgeStack,
) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history with a refused message")
    first = await send_many(owner, room_id, [f"before {i}" for i in range(5)])
    refused = await oversized_image(owner, room_id)
    rest = await send_many(owner, room_id, [f"after {i}" for i in range(5)])
    await until_kept(stack, room_id, 11)
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in [*first, *rest]]
    ghost = ghost_of(owner)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await owner.send_text(room_id, "live")
        *texts, live = await until_live(alice, portal, ghost)
        assert as_sent(texts) == expected
        assert live.body == "live"
        history = await room_history(alice, portal)
        assert not [e for e in history if e.sender == ghost and "image" in str(e.source)]
        notices = await aside_notices(alice, portal)
        assert len(notices) == 1, notices
        assert_the_notice(notices[0], ghost, refused)
        # The notice stands for the message: recorded, the history row gone.
        assert await recorded_event(stack, room_id, refused) == notices[0]["event_id"]
        assert await kept(stack, room_id) == 0
    assert aside_lines(stack, refused) == 1
    assert await set_aside_count("M_TOO_LARGE") == 1
    assert "a very long caption" not in stack.log.read_text(errors="replace")
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_set_aside_cut_by_kill9_before_its_record_is_not_retried(
    stack: BridgeStack,
) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history cut after a refused message")
    first = await send_many(owner, room_id, [f"early {i}" for i in range(20)])
    refused = await oversized_image(owner, room_id)
    rest = await send_many(owner, room_id, [f"late {i}" for i in range(280)])
    await until_kept(stack, room_id, 301)
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in [*first, *rest]]
    ghost = ghost_of(owner)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)

        async def noticed() -> bool:
            return len(await aside_notices(alice, portal)) == 1

        await wait_until(noticed, "the set-aside notice", WITHIN)
        await stack.kill9()
        # The kill fell after the notice and before its record.
        assert await kept(stack, room_id, refused) == 1
        assert await recorded_event(stack, room_id, refused) is None
        await stack.kill9_synapse()  # and Synapse forgets the transaction ids
        await stack.restart()
        await owner.wait_connected()

        await owner.send_text(room_id, "live")
        *texts, _ = await until_live(alice, portal, ghost)
        assert as_sent(texts) == expected  # each once, in order
        notices = await aside_notices(alice, portal)
        assert len(notices) == 1, notices
        assert_the_notice(notices[0], ghost, refused)
        assert await recorded_event(stack, room_id, refused) == notices[0]["event_id"]
        assert await kept(stack, room_id) == 0
    assert aside_lines(stack, refused) == 1  # not tried again after the restart
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_history_row_that_cannot_be_read_is_set_aside_and_the_rest_follows(
    stack: BridgeStack,
) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history with a damaged row")
    echoes = await send_many(owner, room_id, [f"kept {i}" for i in range(7)])
    await until_kept(stack, room_id, 7)
    damaged = echoes[3]
    async with connection(stack.store_url) as conn:
        sql = "SELECT content FROM bridge_backfill WHERE room_id = :r AND log_index = :i"
        params = {"r": room_id, "i": damaged.log_index}
        content = bytearray((await conn.execute(sa.text(sql), params)).scalar_one())
        content[-1] ^= 0x01  # one bit of the sealed content's tag
        await conn.execute(
            sa.text(
                "UPDATE bridge_backfill SET content = :c WHERE room_id = :r AND log_index = :i"
            ),
            {**params, "c": bytes(content)},
        )
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in echoes if m != damaged]
    ghost = ghost_of(owner)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await owner.send_text(room_id, "live")
        *texts, _ = await until_live(alice, portal, ghost)
        assert as_sent(texts) == expected
        notices = await aside_notices(alice, portal)
        assert len(notices) == 1, notices
        body = notices[0]["content"]["body"]
        assert f"log index {damaged.log_index}" in body, body
        assert "could not be read" in body, body
        assert await recorded_event(stack, room_id, damaged.log_index) == notices[0]["event_id"]
        assert await kept(stack, room_id) == 0
    assert aside_lines(stack, damaged.log_index) == 1
    assert await set_aside_count("unreadable") == 1  # (the process of the restart before)
    await owner.close()


async def set_aside_count(reason: str) -> float:
    """The bridge's ``kalandra_bridge_set_aside`` counter for ``reason`` (this process's)."""
    samples = await scrape(METRICS_PORT)
    return value(samples, "kalandra_bridge_set_aside_total", direction="to_matrix", reason=reason)
