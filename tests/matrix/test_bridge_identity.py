"""What users see of the bridge's identity, against a real Synapse, on both databases: `whoami`
and `ping` name the bot's Kalandra member id (and the asker's own); the native CLI adds the
bridge by `bridge` or by the bot's Matrix id (the server names the bridge in HelloReply); every
reply of the bot in an encrypted room (direct chat or portal) is m.room.encrypted on the wire;
and a short session leaves no warning that needs no operator (a user without cross-signing
keys, a typo in a command) in the bridge's log."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from helpers.sql import query
from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    RoomMessageNotice,
)

from bridge.bot import BOT_MEMBER_NAME
from kalandra_core.storage.sql import SqlStore
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    REPO,
    BridgeStack,
    bridge_stack,
    create_portal,
    encrypted_dm,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    say,
    sync_until,
)

WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("identity"),
        request.param,
        bridge_options={"encryption.allow": True, "encryption.default": True},
    ) as stack:
        yield stack


async def bot_member(stack: BridgeStack) -> int:
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.find_member(BOT_MEMBER_NAME)
        assert account is not None
        return account.member_id
    finally:
        await store.close()


def bot_replies(client: AsyncClient, room_id: str) -> list[RoomMessageNotice]:
    """The bot's notices in ``room_id`` from now on, as nio shows them (decrypted or not)."""
    seen: list[RoomMessageNotice] = []

    async def on_notice(room: MatrixRoom, event: RoomMessageNotice) -> None:
        if room.room_id == room_id and event.sender == BOT:
            seen.append(event)

    client.add_event_callback(on_notice, RoomMessageNotice)
    return seen


async def ask(client: AsyncClient, room_id: str, text: str) -> RoomMessageNotice:
    await client.sync(timeout=0)
    replies = bot_replies(client, room_id)
    await say(client, room_id, text)
    await sync_until(client, lambda: bool(replies), f"an answer to {text!r}", within=WITHIN)
    return replies[0]


async def wire_type(client: AsyncClient, room_id: str, event_id: str) -> str:
    """The event's type as the homeserver stores and serves it (not as nio decrypted it)."""
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(event_id)}"
    response = await client.send(
        "GET", path, headers={"Authorization": f"Bearer {client.access_token}"}
    )
    assert response.status == 200, await response.text()
    return str((await response.json())["type"])


async def assert_encrypted_reply(client: AsyncClient, room_id: str, reply: Any) -> None:
    assert reply.decrypted, reply
    assert await wire_type(client, room_id, reply.event_id) == "m.room.encrypted"


@pytest.mark.asyncio(loop_scope="module")
async def test_whoami_and_ping_name_the_bridge_member_and_replies_are_encrypted(
    stack: BridgeStack,
) -> None:
    bot = await bot_member(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        await alice.sync(timeout=0)
        dm = await encrypted_dm(alice)
        welcome = bot_replies(alice, dm)
        await sync_until(alice, lambda: bool(welcome), "the bot's welcome", within=WITHIN)
        await assert_encrypted_reply(alice, dm, welcome[0])

        reply = await ask(alice, dm, "whoami")
        await assert_encrypted_reply(alice, dm, reply)
        assert f"The bridge's Kalandra member id is `{bot}`" in reply.body, reply.body
        assert f"kalandra invite ROOM {bot}" in reply.body
        assert "You have no Kalandra member" in reply.body
        reply = await ask(alice, dm, "ping")
        await assert_encrypted_reply(alice, dm, reply)
        assert reply.body.startswith("Pong: the Kalandra server is up"), reply.body
        assert f"member id is `{bot}`" in reply.body

        # In an encrypted portal she joined: her own member too, and the reply encrypted.
        _, portal = await create_portal(alice, "who am i")
        assert alice.rooms[portal].encrypted
        async with asyncio.timeout(WITHIN):
            while True:
                reply = await ask(alice, portal, "!kalandra whoami")
                if "Your Kalandra member id is" in reply.body:
                    break
                await asyncio.sleep(0.5)
        await assert_encrypted_reply(alice, portal, reply)
        mine = re.search(r"Your Kalandra member id is `(\d+)`", reply.body)
        assert mine, reply.body
        assert int(mine[1]) == await bridged_member_of(stack, alice.user_id)
        assert f"`{bot}`" in reply.body
        # A refusal is a reply too.
        reply = await ask(alice, portal, "!kalandra no-such-command")
        await assert_encrypted_reply(alice, portal, reply)


async def bridged_member_of(stack: BridgeStack, mxid: str) -> int:
    """The Kalandra member the bridge made for ``mxid``: made as the bridge handles the user's
    join of a portal, which may come after the user's client saw its join."""
    async with asyncio.timeout(WITHIN):
        while True:
            rows = await query(
                stack.store_url, "SELECT member_id FROM bridge_users WHERE mxid = :m", m=mxid
            )
            if rows and rows[0][0] is not None:
                break
            await asyncio.sleep(0.2)
    assert len(rows) == 1, rows
    return int(rows[0][0]) % (1 << 64)


def kalandra(state: Path, *args: str) -> str:
    """The native CLI (`kalandra ...`) as a user runs it; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "kalandra_core", *args, "--state", str(state)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def new_native_login(stack: BridgeStack, state: Path) -> int:
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.create_member(f"cli_{secrets.token_hex(3)}")
        token = await store.issue_token(account.member_id)
    finally:
        await store.close()
    server = f"tcp://127.0.0.1:{stack.tcp_port}"
    out = await asyncio.to_thread(kalandra, state, "login", "--server", server, "--token", token)
    assert f"logged in as member {account.member_id}" in out
    return account.member_id


def members_of(out: str) -> set[int]:
    return {int(m) for m in re.findall(r"^leaf \d+\t(\d+)", out, re.M)}


@pytest.mark.asyncio(loop_scope="module")
async def test_native_cli_adds_the_bridge_by_name_and_by_its_matrix_id(
    stack: BridgeStack, tmp_path: Path
) -> None:
    bot = await bot_member(stack)
    state = tmp_path / "native.db"
    await new_native_login(stack, state)
    async with nio_client(stack.synapse, stack.user) as alice:
        await alice.sync(timeout=0)
        invites: list[str] = []

        async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
            if event.state_key == alice.user_id and event.membership == "invite":
                invites.append(room.room_id)

        alice.add_event_callback(on_invite, InviteMemberEvent)

        # `bridge`, then a Matrix user through it, in one command.
        room = (await asyncio.to_thread(kalandra, state, "create-room", "--name", "cli")).strip()
        out = await asyncio.to_thread(kalandra, state, "invite", room, "bridge", alice.user_id)
        assert "added at log index" in out, out
        assert f"invited {alice.user_id} through the bridge" in out, out
        assert bot in members_of(await asyncio.to_thread(kalandra, state, "members", room))
        await sync_until(alice, lambda: bool(invites), "the portal's invitation", within=WITHIN)

        # The bot's own Matrix id is the bridge's member (added), not a Matrix user to let in.
        other = (await asyncio.to_thread(kalandra, state, "create-room")).strip()
        out = await asyncio.to_thread(kalandra, state, "invite", other, BOT)
        assert "added at log index" in out, out
        assert "through the bridge" not in out, out
        assert bot in members_of(await asyncio.to_thread(kalandra, state, "members", other))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_session_logs_no_warning_that_needs_no_operator(stack: BridgeStack) -> None:
    # nio's devices have no cross-signing keys (mautrix warned for each look at them), and a
    # typo in a moderation command is answered to the user (it warned "code 770" as well).
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "quiet log")
        await say(alice, portal, "hello")
        got: list[Any] = []
        await asyncio.wait_for(
            messages_from_others(native, got, 1, bytes.fromhex(room_hex)), WITHIN
        )
        await native.send_text(bytes.fromhex(room_hex), "hello back")
        reply = await ask(alice, portal, "!kalandra kick 12345")
        assert reply.body.startswith("The Kalandra server refused"), reply.body
    await native.close()
    log = stack.log.read_text(errors="replace")
    assert re.search(r"INFO\s+kalandra\.bridge\.bot: bot request failed .* code 770", log), log[
        -3000:
    ]
    noise = (
        "Didn't find cross-signing key",
        "isn't cross-signed",
        "No one-time keys nor device keys",
        "bot request failed",
    )
    noisy = [
        line for line in log.splitlines() if "WARNING" in line and any(n in line for n in noise)
    ]
    assert noisy == [], noisy
