"""One bad item never blocks the rest, against a real Synapse, on SQLite and on PostgreSQL.

* The whole bridge: one appservice transaction of Synapse may carry 100 events of up to 64 KiB;
  a refused one is sent again forever, so the bridge takes what Synapse sends, and says so
  loudly (an error line once per transaction, the readiness probe) when it still refuses one.
* One portal toward Matrix: a native text too large for one Matrix event arrives split, whole;
  a message the homeserver refuses for good (its ghost banned in Matrix while still a Kalandra
  member) is set aside with a notice; the messages after either still arrive.
* Toward Kalandra: Matrix messages the bridge cannot bridge (an unsupported kind, a file that
  is not on the homeserver) are refused visibly, and the next message still arrives.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nio import AsyncClient, RoomBanResponse, RoomMessageNotice, RoomSendResponse
from ruamel.yaml import YAML

from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message
from matrix.bridge_members import account_id, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    ghost_texts,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
)

BIG_EVENTS = 30  # of ~60 KB each: one transaction of ~1.8 MB
WITHIN = 120.0
BOT_NAME = "kalandrabot"
KALANDRA_ROOM: dict[str, bytes] = {}  # portal room id -> its Kalandra room


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("nostall"), request.param) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def portal(stack: BridgeStack) -> AsyncIterator[tuple[AsyncClient, Client, str]]:
    """alice (bridge admin) and a native member in one portal."""
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, room = await portal_with_native(alice, native, "no stall")
        KALANDRA_ROOM[room] = bytes.fromhex(room_hex)
        yield alice, native, room
    await native.close()


async def send_text(alice: AsyncClient, room: str, body: str) -> None:
    sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(sent, RoomSendResponse), sent


async def next_bodies(native: Client, count: int) -> list[str]:
    received: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, received, count), WITHIN)
    return [m.content.body for m in received]


async def bot_notices(alice: AsyncClient, room: str) -> list[str]:
    return [
        e.body
        for e in await room_history(alice, room)
        if isinstance(e, RoomMessageNotice) and e.sender == BOT
    ]


# --- the whole bridge --------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_a_transaction_of_many_large_events_is_accepted(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str]
) -> None:
    alice, native, room = portal
    bodies = [f"{i:03d} " + "x" * 60_000 for i in range(BIG_EVENTS)]
    assert stack.bridge is not None
    # The bridge stopped (not gone) while alice sends: Synapse's transaction in flight waits
    # for it, and the events sent meanwhile make one transaction of ~1.8 MB.
    os.kill(stack.bridge.pid, signal.SIGSTOP)
    try:
        for body in bodies:
            await send_text(alice, room, body)
    finally:
        os.kill(stack.bridge.pid, signal.SIGCONT)
    await send_text(alice, room, "after the large ones")
    assert await next_bodies(native, BIG_EVENTS + 1) == [*bodies, "after the large ones"]


def hs_token(stack: BridgeStack) -> str:
    with open(stack.config, encoding="utf-8") as fh:
        return str(YAML(typ="safe").load(fh)["appservice"]["hs_token"])


async def put_declared(stack: BridgeStack, txn_id: str, declared: int) -> int:
    """A transaction PUT with the right token declaring ``declared`` bytes (only a few sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.as_port)
    try:
        head = [
            f"PUT /_matrix/app/v1/transactions/{txn_id} HTTP/1.1",
            "Host: 127.0.0.1",
            "Content-Type: application/json",
            f"Authorization: Bearer {hs_token(stack)}",
            f"Content-Length: {declared}",
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"events": []')
        await writer.drain()
        async with asyncio.timeout(30):
            status_line = await reader.readline()
            await reader.read()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def readiness(stack: BridgeStack) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.as_port}/_matrix/mau/ready"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_refused_transaction_is_logged_once_and_shown_by_the_readiness_probe(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str]
) -> None:
    alice, native, room = portal
    txn_id = f"huge-{stack.as_port}"
    for _ in range(2):  # Synapse sends a refused transaction again: one error line only
        assert await put_declared(stack, txn_id, 64 * 1024 * 1024) == 413
    lines = [
        line
        for line in stack.log.read_text(errors="replace").splitlines()
        if f"appservice transaction {txn_id} refused" in line
    ]
    assert len(lines) == 1, lines
    assert " ERROR " in lines[0], lines
    status, body = await readiness(stack)
    assert status == 503, body
    assert "transactions" in body["waiting_for"], body
    assert body["refused_transaction"]["id"] == txn_id, body

    # The next transaction Synapse sends is accepted: the probe is ready again.
    await send_text(alice, room, "after the refusal")
    assert await next_bodies(native, 1) == ["after the refusal"]

    async def ready() -> bool:
        return (await readiness(stack))[0] == 200

    await wait_until(ready, "ready again", 30)


# --- one portal, toward Matrix -----------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_an_oversized_native_text_arrives_split_and_the_next_message_follows(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str]
) -> None:
    alice, native, room = portal
    ghost = ghost_of(native)
    before = len(await ghost_texts(alice, room, ghost))
    line = "the quick brown fox jumps over the lazy dog"
    big = "".join(f"line {i:05d}: {line}\n" for i in range(2000))
    assert len(big.encode()) > 100 * 1024
    big_index = await native.send_text(KALANDRA_ROOM[room], big)
    await native.send_text(KALANDRA_ROOM[room], "after the big one")

    async def arrived() -> list[Any] | None:
        texts = (await ghost_texts(alice, room, ghost))[before:]
        return texts if texts and texts[-1].body == "after the big one" else None

    texts = await wait_until(arrived, "the message after the big one", WITHIN)
    parts = texts[:-1]
    assert len(parts) > 1
    assert "".join(t.body for t in parts) == big
    contents = [t.source["content"] for t in parts]
    assert [c["org.kalandra.log_index"] for c in contents] == [big_index] * len(parts)
    assert [c["org.kalandra.part"] for c in contents] == list(range(len(parts)))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_banned_ghosts_message_is_set_aside_and_the_next_message_follows(
    stack: BridgeStack,
) -> None:
    owner, member = await native_client(stack), await native_client(stack)
    # A room of the native owner: the bot may not moderate it, so the Matrix ban of the
    # member's ghost does not remove the member from Kalandra.
    bot = await account_id(stack, BOT_NAME)
    kalandra_room = await native_room(owner, bot, "ban")
    await owner.invite(kalandra_room, [member.core.member_id])
    await owner.settle()
    await member.wait_for(lambda: kalandra_room in member.core.rooms)
    await member.settle()
    async with nio_client(stack.synapse, stack.user) as alice:
        room = await open_portal(alice, kalandra_room)
        await member.send_text(kalandra_room, "before the ban")

        async def joined_and_bridged() -> bool:
            texts = await ghost_texts(alice, room, ghost_of(member))
            return [t.body for t in texts] == ["before the ban"]

        await wait_until(joined_and_bridged, "the member's first message", WITHIN)
        banned = await alice.room_ban(room, ghost_of(member), reason="test")
        assert isinstance(banned, RoomBanResponse), banned

        refused_index = await member.send_text(kalandra_room, "from the banned ghost")
        await owner.send_text(kalandra_room, "after the ban")

        async def after() -> bool:
            texts = await ghost_texts(alice, room, ghost_of(owner))
            return [t.body for t in texts] == ["after the ban"]

        await wait_until(after, "the owner's message after the ban", WITHIN)
        texts = await ghost_texts(alice, room, ghost_of(member))
        assert [t.body for t in texts] == ["before the ban"]
        notices = [n for n in await bot_notices(alice, room) if "could not be bridged" in n]
        assert len(notices) == 1, notices
        assert ghost_of(member) in notices[0], notices
        assert f"log index {refused_index}" in notices[0], notices
        assert "M_FORBIDDEN" in notices[0], notices

        # Recorded: after a kill -9 the bridge neither tries it again nor forgets it.
        aside = f"(log index {refused_index}) set aside"
        assert stack.log.read_text(errors="replace").count(aside) == 1
        await stack.kill9()
        await stack.restart()
        await owner.send_text(kalandra_room, "after the restart")

        async def after_restart() -> bool:
            texts = await ghost_texts(alice, room, ghost_of(owner))
            return [t.body for t in texts] == ["after the ban", "after the restart"]

        await wait_until(after_restart, "the owner's message after the restart", WITHIN)
        again = [n for n in await bot_notices(alice, room) if "could not be bridged" in n]
        assert again == notices
        assert stack.log.read_text(errors="replace").count(aside) == 1
    for client in (owner, member):
        await client.close()


# --- toward Kalandra ---------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_messages_refused_for_good_do_not_block_the_next_one(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str]
) -> None:
    alice, native, room = portal
    refusals_before = [
        n for n in await bot_notices(alice, room) if n.startswith("Not bridged to Kalandra")
    ]
    unknown = {"msgtype": "org.example.poll", "body": "vote"}
    missing = {"msgtype": "m.image", "body": "gone.png", "url": "mxc://localhost/notthere"}
    for content in (unknown, missing):
        sent = await alice.room_send(room, "m.room.message", content)
        assert isinstance(sent, RoomSendResponse), sent
    await send_text(alice, room, "after the refused ones")
    assert await next_bodies(native, 1) == ["after the refused ones"]

    async def refused() -> list[str] | None:
        notices = [
            n for n in await bot_notices(alice, room) if n.startswith("Not bridged to Kalandra")
        ]
        return notices if len(notices) == len(refusals_before) + 2 else None

    notices = (await wait_until(refused, "two refusal notices", 30))[len(refusals_before) :]
    assert "org.example.poll is not supported" in notices[0], notices
    assert "not on the homeserver" in notices[1], notices
