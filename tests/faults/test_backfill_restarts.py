"""A backfill cut by kill -9 of the bridge and of Synapse while a batch of its history was in
Matrix but not yet recorded, then resumed (real Synapse, SQLite and PostgreSQL).

A backfill sends its history one message after the other and records it in batches behind
(bridge/portal/backfill.py), so a kill leaves messages sent and not recorded; Synapse forgets
the appservice's transaction ids when it restarts, so sending them again would double them.
``KALANDRA_TEST_BACKFILL_RECORD_LAG`` holds each batch back a few seconds, so the kills always
fall between sends and their record; the test checks that they did. After the restart every
message is in the portal once, in log order, at its original time, before anything live, and
the progress notices are one per ``progress_interval`` messages of each run plus one at its end.
A reply and an edit in the history point at their targets' events (each waits until the
records before it are written). An event of a Matrix user that carries a history message's
log index does not pass for that message when the backfill looks for what it sent before.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers.sql import query
from matrix.bridge_members import account_id, native_room, open_portal
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
from matrix.test_bridge_backfill import as_sent, send_many, until_text, wait_texts
from matrix.test_bridge_epochs import BOT_NAME
from nio import RoomMessageNotice, RoomSendResponse

from kalandra_core.client.content import Content

LAG = "3"  # seconds each batch of history waits before it is recorded
COUNT = 400
INTERVAL = 50
_PROGRESS = re.compile(r"^History: (\d+) of (\d+) earlier messages bridged\.$")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_BACKFILL_RECORD_LAG")
    os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"] = LAG  # read by the bridges started here
    try:
        async with bridge_stack(
            tmp_path_factory.mktemp("backfillcut"),
            request.param,
            bridge_options={"backfill.progress_interval": INTERVAL},
        ) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_BACKFILL_RECORD_LAG"] = before


async def kept(stack: BridgeStack, room_id: bytes) -> int:
    """History rows the bridge still has for the room: not yet recorded as bridged."""
    rows = await query(
        stack.store_url, "SELECT COUNT(*) FROM bridge_backfill WHERE room_id = :r", r=room_id
    )
    return int(rows[0][0])


@pytest.mark.asyncio(loop_scope="module")
async def test_backfill_cut_between_send_and_record_resumes_once_each(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history cut mid-batch")
    echoes = await send_many(owner, room_id, [f"batch {i}" for i in range(COUNT)])
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in echoes]
    ghost = ghost_of(owner)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await wait_texts(alice, portal, ghost, 2 * INTERVAL, within=180)
        await stack.kill9()
        in_matrix = len(await ghost_texts(alice, portal, ghost))
        left = await kept(stack, room_id)
        # The kill fell between sends and their record: some are both in Matrix and kept.
        assert left >= 2 * INTERVAL, (in_matrix, left)
        assert in_matrix + left > COUNT, (in_matrix, left)
        await stack.kill9_synapse()  # and Synapse forgets the transaction ids
        await stack.restart()
        await owner.wait_connected()

        await owner.send_text(room_id, "live")
        await until_text(alice, portal, ghost, "live")
        *texts, live = await ghost_texts(alice, portal, ghost)
        assert as_sent(texts) == expected
        assert live.body == "live"
        assert await kept(stack, room_id) == 0

        notices = [
            e.body
            for e in await room_history(alice, portal)
            if isinstance(e, RoomMessageNotice) and e.sender == BOT
        ]
    # Each of the two runs: "n of total" at every INTERVAL messages it sent; the second one,
    # which went to its end, then "all" once.
    runs: list[tuple[int, list[int]]] = []
    finals: list[str] = []
    for notice in notices:
        match = _PROGRESS.match(notice)
        if match is None:
            finals.append(notice)
            continue
        done, total = int(match.group(1)), int(match.group(2))
        if not runs or total != runs[-1][0] or done <= runs[-1][1][-1]:
            runs.append((total, []))
        runs[-1][1].append(done)
    assert [total for total, _ in runs] == [COUNT, left], notices
    for _, done_at in runs:
        assert done_at == list(range(INTERVAL, (len(done_at) + 1) * INTERVAL, INTERVAL)), notices
    assert runs[-1][1][-1] + INTERVAL >= left, notices
    assert finals == [f"History: all {left} earlier messages bridged."], notices
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_reply_and_an_edit_in_the_history_point_at_their_targets(
    stack: BridgeStack,
) -> None:
    """Each waits for the records before it (held back by the lag), where its target's event
    is looked up: a reply and an edit of the message just before them."""
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history with relations")
    echoes = await send_many(owner, room_id, [f"said {i}" for i in range(5)])
    question, typo = echoes[-2], echoes[-1]
    reply = await owner.send(room_id, Content(body="answer", reply_to=question.log_index))
    edit = await owner.send(room_id, Content(body="* fixed", edit_of=typo.log_index))
    await owner.settle()
    async with asyncio.timeout(60):
        while await kept(stack, room_id) < 7:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await wait_texts(alice, portal, ghost_of(owner), 7, within=120)
        by_index = {
            e.source["content"]["org.kalandra.log_index"]: e.source
            for e in await room_history(alice, portal)
            if "org.kalandra.log_index" in e.source.get("content", {})
        }
    relates = by_index[reply]["content"]["m.relates_to"]
    assert relates == {"m.in_reply_to": {"event_id": by_index[question.log_index]["event_id"]}}
    relates = by_index[edit]["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.replace"
    assert relates["event_id"] == by_index[typo.log_index]["event_id"]
    await owner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_matrix_users_event_with_a_log_index_does_not_pass_for_history(
    stack: BridgeStack,
) -> None:
    owner = await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    room_id = await native_room(owner, bot, "history and a forged index")
    echoes = await send_many(owner, room_id, [f"true {i}" for i in range(300)])
    expected = [(m.log_index, m.content.body, m.timestamp_ms) for m in echoes]
    ghost = ghost_of(owner)

    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, room_id)
        await wait_texts(alice, portal, ghost, 20, within=120)
        await stack.kill9()
        last = echoes[-1].log_index
        rows = await query(
            stack.store_url,
            "SELECT COUNT(*) FROM bridge_backfill WHERE room_id = :r AND log_index = :i",
            r=room_id,
            i=last,
        )
        assert rows[0][0] == 1  # not bridged yet
        # The room's newest event when the backfill looks again: a Matrix user's, claiming to
        # be the last history message.
        forged = {"msgtype": "m.text", "body": "forged", "org.kalandra.log_index": last}
        sent = await alice.room_send(portal, "m.room.message", forged)
        assert isinstance(sent, RoomSendResponse), sent
        await stack.restart()
        await owner.wait_connected()

        await owner.send_text(room_id, "live")
        await until_text(alice, portal, ghost, "live")
        *texts, _ = await ghost_texts(alice, portal, ghost)
        assert as_sent(texts) == expected
        assert await kept(stack, room_id) == 0
    await owner.close()
