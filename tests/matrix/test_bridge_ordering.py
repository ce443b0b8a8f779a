"""Ordering both ways at once against a real Synapse: a Matrix user and a native member each
send 200 messages into one portal concurrently (some of them HTML-formatted). Each side gets
every message of the other exactly once, in the order it was sent, with its formatting: the
Matrix user as the native member's ghost's events, the native member as Kalandra messages
from the Matrix user's puppet leaf. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix, marker_to_native
from helpers.matrix import send_numbered

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
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

COUNT = 200
WITHIN = 300.0  # seconds for everything to arrive: a loaded 2-core machine is slow


def formatted(i: int) -> bool:
    return i % 7 == 3


def html(side: str, i: int) -> str:
    return f"<b>{side}</b> <i>{i}</i>"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("ordering"), request.param) as stack:
        yield stack


def matrix_content(i: int) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": f"matrix {i}"}
    if formatted(i):
        content |= {"format": "org.matrix.custom.html", "formatted_body": html("matrix", i)}
    return content


async def native_sender(native: Client, room: bytes) -> None:
    for i in range(COUNT):
        rich = html("native", i) if formatted(i) else None
        await native.send(room, Content(f"native {i}", formatted_body=rich))


@pytest.mark.asyncio(loop_scope="module")
async def test_both_ways_at_once_exactly_once_in_order_with_formatting(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "ordering")
        room = bytes.fromhex(room_hex)
        ghost = ghost_of(native)

        received: list[Message] = []
        receiving = asyncio.create_task(messages_from_others(native, received, COUNT))
        await asyncio.gather(
            send_numbered(alice, portal, COUNT, content=matrix_content),
            native_sender(native, room),
        )
        await asyncio.wait_for(receiving, WITHIN)
        # Nothing more (no duplicate) arrives on either side: a marker each way goes behind
        # the messages through the same ordered queue, and Matrix shows the native marker only
        # once every native message before it is there.
        _, late = await marker_to_native(alice, portal, native, room, WITHIN)
        marker = await marker_to_matrix(native, room, alice, portal, ghost, WITHIN)
        seen = await ghost_texts(alice, portal, ghost)
        assert seen[-1].body == marker
        seen = seen[:-1]

        # Matrix side: the native member's messages, once each, in order, formatting kept.
        assert [e.body for e in seen] == [f"native {i}" for i in range(COUNT)]
        assert len({e.event_id for e in seen}) == COUNT
        for i, event in enumerate(seen):
            if formatted(i):
                assert event.format == "org.matrix.custom.html", i
                assert event.formatted_body == html("native", i), i
            else:
                assert event.formatted_body is None, i

        # Native side: the Matrix user's messages, once each, in order, formatting kept.
        assert late == []
        assert [m.content.body for m in received] == [f"matrix {i}" for i in range(COUNT)]
        assert len({m.sender_id for m in received}) == 1
        assert len({m.log_index for m in received}) == COUNT
        assert [m.log_index for m in received] == sorted(m.log_index for m in received)
        for i, message in enumerate(received):
            expected = html("matrix", i) if formatted(i) else None
            assert message.content.formatted_body == expected, i
    await native.close()
