"""Matrix events sent while the bridge was down reach Kalandra without any nudge.

Synapse sends an appservice the events it stored for it only when a new event wakes its
scheduler up ("not in recovery, not forcing retry" when the bridge comes back), and forgets
what it had not stored if it dies. So the bridge catches up by itself
(bridge/appservice/catch_up.py).

Each test: a portal with a native member, where the Matrix user's message was bridged; the
bridge stops (SIGTERM, or kill -9, and in one variant Synapse restarts too); meanwhile the
Matrix user sends a text, a reaction to, an edit of and a redaction of the bridged message, an
image and a last text; the bridge starts again (in one variant after a restart of Synapse, which
then holds those events stored and no retry going) and NOTHING else is sent. The native
member receives all six, in order, exactly once (a message sent afterwards, which wakes up
Synapse's replay of what it stored, comes after them with no duplicate in between).
"""

from __future__ import annotations

import asyncio
import io
import secrets
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
)
from nio import AsyncClient, RoomRedactResponse, RoomSendResponse, UploadResponse

from kalandra_core.client import events as ev
from kalandra_core.client.driver import Client

WITHIN = 120.0  # seconds from the bridge being ready (the target is 30 s; a loaded machine)

Outage = Callable[[BridgeStack], Awaitable[None]]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("catch-up"),
        request.param,
        bridge_options={"message_status_success": True},
    ) as stack:
        yield stack


async def statuses(alice: AsyncClient, room: str, event_id: str) -> list[str]:
    """The bridge's status events for ``event_id`` so far, oldest first."""
    return [
        event.source["content"].get("status")
        for event in await room_history(alice, room)
        if event.source.get("type") == "com.beeper.message_send_status"
        and event.source["content"].get("m.relates_to", {}).get("event_id") == event_id
        and event.source["content"].get("status") != "PENDING"  # (a slow queue shows one)
    ]


async def wait_status(alice: AsyncClient, room: str, event_id: str) -> None:
    """Until the bridge says ``event_id`` is bridged (so it is recorded as done)."""
    async with asyncio.timeout(WITHIN):
        while not await statuses(alice, room, event_id):  # noqa: ASYNC110
            await asyncio.sleep(0.3)


async def native_member(stack: BridgeStack) -> Client:
    """A native member whose client reports reactions and moderation."""
    return await native_client(stack, 2, extended=True)


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x10\x20\x30" * 2 for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def send(alice: AsyncClient, room: str, kind: str, content: dict[str, Any]) -> str:
    sent = await alice.room_send(room, kind, content, tx_id=secrets.token_hex(8))
    assert isinstance(sent, RoomSendResponse), sent
    return str(sent.event_id)


def seen(item: ev.Message | ev.Reacted | ev.Moderated) -> tuple[Any, ...]:
    """What the native member got, comparable: its kind and what it says."""
    if isinstance(item, ev.Reacted):
        return ("reaction", item.target, item.key)
    if isinstance(item, ev.Moderated):
        return (item.action, item.target)
    content = item.content
    if content.media is not None:
        return ("media", content.kind, content.body)
    return ("text", content.body, content.edit_of)


async def received(native: Client, until: str) -> list[tuple[Any, ...]]:
    """Everything from other members, in log order, up to the text ``until``."""
    found: list[tuple[int, tuple[Any, ...]]] = []

    async with asyncio.timeout(WITHIN):
        while True:
            message = await native.messages.get()
            if message.sender_id != native.core.member_id:
                found.append((message.log_index, seen(message)))
                if message.content.body == until:
                    break
    # The client decodes the log in order: what came before ``until`` is in its queues now.
    while not native.events.empty():
        event = native.events.get_nowait()
        if isinstance(event, ev.Reacted | ev.Moderated):
            found.append((event.log_index, seen(event)))
    return [item for _, item in sorted(found)]


async def sigterm(stack: BridgeStack) -> None:
    await stack.stop_bridge()


async def kill9(stack: BridgeStack) -> None:
    await stack.kill9()


async def bridge_only(stack: BridgeStack) -> None:
    await stack.restart()


async def synapse_then_bridge(stack: BridgeStack) -> None:
    """Synapse restarts with the events it could not send stored (and its retry forgotten)."""
    await stack.synapse.restart()
    await stack.restart()


async def missed_while_down(stack: BridgeStack, down: Outage, up: Outage) -> None:
    native = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        _, portal = await portal_with_native(alice, native, "catch up")
        before = await send(alice, portal, "m.room.message", {"msgtype": "m.text", "body": "b"})
        async with asyncio.timeout(WITHIN):
            first = await native.messages.get()
        assert first.content.body == "b"
        await wait_status(alice, portal, before)
        target = first.log_index

        await down(stack)
        await alice.close()  # a new connection to the (maybe restarted) Synapse
        await send(alice, portal, "m.room.message", {"msgtype": "m.text", "body": "one"})
        reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": before, "key": "+"}}
        await send(alice, portal, "m.reaction", reaction)
        edit = {
            "msgtype": "m.text",
            "body": "* b2",
            "m.new_content": {"msgtype": "m.text", "body": "b2"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": before},
        }
        await send(alice, portal, "m.room.message", edit)
        image = png()
        uploaded, _ = await alice.upload(
            io.BytesIO(image), content_type="image/png", filename="p.png", filesize=len(image)
        )
        assert isinstance(uploaded, UploadResponse), uploaded
        info = {"mimetype": "image/png", "size": len(image), "w": 2, "h": 2}
        media = {"msgtype": "m.image", "body": "p.png", "url": uploaded.content_uri, "info": info}
        await send(alice, portal, "m.room.message", media)
        redacted = await alice.room_redact(portal, before, tx_id=secrets.token_hex(8))
        assert isinstance(redacted, RoomRedactResponse), redacted
        await send(alice, portal, "m.room.message", {"msgtype": "m.text", "body": "last"})

        await up(stack)  # and nothing else is sent until all of it is in Kalandra
        await alice.close()
        expected = [
            ("text", "one", None),
            ("reaction", target, "+"),
            ("text", "b2", target),
            ("media", "image", "p.png"),
            ("redact", target),
            ("text", "last", None),
        ]
        assert await received(native, "last") == expected
        # Now Synapse sends what it stored (if anything) ahead of this: none of it again.
        await send(alice, portal, "m.room.message", {"msgtype": "m.text", "body": "after"})
        assert await received(native, "after") == [("text", "after", None)]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_bridge_stopped_catches_up_on_start(stack: BridgeStack) -> None:
    await missed_while_down(stack, sigterm, bridge_only)


@pytest.mark.asyncio(loop_scope="module")
async def test_bridge_killed_catches_up_on_start(stack: BridgeStack) -> None:
    await missed_while_down(stack, kill9, bridge_only)


@pytest.mark.asyncio(loop_scope="module")
async def test_bridge_killed_and_synapse_restarted_catches_up_on_start(
    stack: BridgeStack,
) -> None:
    await missed_while_down(stack, kill9, synapse_then_bridge)
