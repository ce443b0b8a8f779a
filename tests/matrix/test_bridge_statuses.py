"""Message statuses as com.beeper.message_send_status defines them, against a real Synapse: a
Matrix message that waits (here each message is held 3 s after Kalandra sequenced it, so the
portal is busy and the later messages queue behind it) gets one PENDING status after 2 s and
then exactly one final status: SUCCESS (even with ``message_status_success`` off, the default:
a client showing it in progress must learn the outcome) or FAIL_PERMANENT with its reason and a
readable message. A message bridged at once gets no status at all (the default config).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from nio import AsyncClient, RoomSendResponse

from bridge.portal.statuses import PENDING_AFTER
from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    say,
)

STATUS = "com.beeper.message_send_status"
LAG = "3"  # seconds each Matrix message is held once sequenced (KALANDRA_TEST_RECORD_LAG)
FINAL = {"SUCCESS", "FAIL_RETRIABLE", "FAIL_PERMANENT"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_RECORD_LAG")
    os.environ["KALANDRA_TEST_RECORD_LAG"] = LAG  # read by the bridge processes started here
    try:
        async with bridge_stack(tmp_path_factory.mktemp("statuses")) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_RECORD_LAG"]
        else:
            os.environ["KALANDRA_TEST_RECORD_LAG"] = before


async def statuses_of(client: AsyncClient, room: str) -> dict[str, list[dict[str, Any]]]:
    """The status events' contents per event id they are about, in timeline order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for event in await room_history(client, room):
        if event.source.get("type") == STATUS:
            assert event.sender == BOT
            content = event.source["content"]
            out.setdefault(content["m.relates_to"]["event_id"], []).append(content)
    return out


async def wait_final(client: AsyncClient, room: str, events: list[str]) -> None:
    async with asyncio.timeout(90):
        while True:
            found = await statuses_of(client, room)
            if all(any(s["status"] in FINAL for s in found.get(e, [])) for e in events):
                return
            await asyncio.sleep(0.5)


@pytest.mark.asyncio(loop_scope="module")
async def test_waiting_messages_get_pending_then_one_final_status(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "statuses")
        first = await say(alice, portal, "first")
        second = await say(alice, portal, "second")
        # A media message without a file: refused for good, once the queue reaches it.
        sent = await alice.room_send(
            portal, "m.room.message", {"msgtype": "m.image", "body": "no file"}
        )
        assert isinstance(sent, RoomSendResponse), sent
        refused = sent.event_id
        # A marker behind them: its final status comes after every status of theirs (the
        # portal's queue handles them in order, sends failures before going on and hands
        # successes, in that order, to one task that sends each after its PENDING), so a
        # second final status (or a late PENDING) would show before it.
        marker = await say(alice, portal, "marker")
        await wait_final(alice, portal, [first, second, refused, marker])
        found = await statuses_of(alice, portal)
        assert [s["status"] for s in found[marker]] == ["PENDING", "SUCCESS"], found[marker]
        assert [s["status"] for s in found[first]] == ["PENDING", "SUCCESS"], found[first]
        assert [s["status"] for s in found[second]] == ["PENDING", "SUCCESS"], found[second]
        assert [s["status"] for s in found[refused]] == ["PENDING", "FAIL_PERMANENT"]
        failure = found[refused][-1]
        assert failure["reason"] == "com.beeper.unsupported_event"
        assert failure["message"] == "a media message without a file."
        assert all(s["network"] == "kalandra" for s in found[first] + found[refused])
        got: list[Message] = []
        await asyncio.wait_for(messages_from_others(native, got, 3, bytes.fromhex(room_hex)), 30)
        assert [m.content.body for m in got] == ["first", "second", "marker"]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_message_bridged_at_once_gets_no_status(stack: BridgeStack) -> None:
    """Without the lag (bridge restarted without it): with message_status_success off, a
    message that never waited has no status event, PENDING included."""
    del os.environ["KALANDRA_TEST_RECORD_LAG"]
    try:
        await stack.stop_bridge()
        await stack.restart()
        native = await native_client(stack)
        async with nio_client(stack.synapse, stack.user) as alice:
            room_hex, portal = await portal_with_native(alice, native, "no status")
            got: list[Message] = []
            room = bytes.fromhex(room_hex)
            await say(alice, portal, "warm-up")  # (after alice's join, which takes a commit)
            await asyncio.wait_for(messages_from_others(native, got, 1, room), 30)
            quick = await say(alice, portal, "quick")
            await asyncio.wait_for(messages_from_others(native, got, 2, room), 30)
            # A PENDING status is a timer's (PENDING_AFTER seconds after the message was
            # queued, before it reached the native member), not an event in any queue a
            # marker could follow: wait it out, and a second for the send.
            await asyncio.sleep(PENDING_AFTER + 1)
            assert quick not in await statuses_of(alice, portal)
        await native.close()
    finally:
        os.environ["KALANDRA_TEST_RECORD_LAG"] = LAG
