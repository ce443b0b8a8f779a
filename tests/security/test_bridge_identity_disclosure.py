"""What the bridge's identity discloses, against a real Synapse, the bridge process and its
embedded Kalandra server: the bot's Kalandra member id is public by design (a native member
needs it to let the bridge into a room), and nothing else comes with it.

- `whoami` and `ping` asked by a Matrix user who is no bridge admin name the bot's member id
  and the asker's own (if any), never another member's id, another user's Matrix id or a room;
  a `relay` user, whom the bot does not serve, gets its refusal, which names nothing.
- A connection to the Kalandra server that has not authenticated (a Ping, a Hello with a wrong
  token, a Hello whose proof does not verify) receives no byte of the bot's member id or Matrix id.
- An authenticated native member that shares no room with the bridge gets exactly the bot's
  member id and Matrix id in its HelloReply (``bridge_member_id``, ``bridge_mxid``), besides
  its own session's fields.

The people and rooms whose ids must not leak: the admin, who has a portal with a native member
(so the admin has a bridged member, the native member a ghost) and a bridged room.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    create_portal,
    native_client,
    nio_client,
    open_dm,
    portal_with_native,
    sync_until,
)
from matrix.test_bridge_identity import bot_member, bridged_member_of
from nacl.signing import SigningKey

from bridge.commands import REFUSAL
from kalandra_core.proto import ErrorCode, HelloReply, Opcode
from kalandra_core.storage.sql import SqlStore
from security.hostile import Account, error_of, expect_error, raw

WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("identity-disclosure"),
        "sqlite",
        others=("user", "relay"),
        default_level="none",
    ) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secrets_(stack: BridgeStack) -> AsyncIterator[dict[str, Any]]:
    """Ids that only the admin's own business shows: her bridged member, the native member
    with her in a portal, the Kalandra room and its portal."""
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "not yours")
        yield {
            "bot": await bot_member(stack),
            "alice": alice.user_id,
            "alice_member": await bridged_member_of(stack, alice.user_id),
            "native": native.core.member_id,
            "room": room_hex,
            "portal": portal,
        }
    await native.close()


def disclosed(text: str) -> dict[str, set[str]]:
    """The ids a reply names: member ids (long numbers), Matrix ids, Kalandra and Matrix room
    ids."""
    return {
        "numbers": set(re.findall(r"\d{10,}", text)),
        "mxids": set(re.findall(r"@[a-z0-9._=/+-]+:[a-z0-9.:-]+", text)),
        "rooms": set(re.findall(r"\b[0-9a-f]{32}\b", text)),
        "matrix_rooms": set(re.findall(r"![A-Za-z0-9._=/+-]+:[a-z0-9.:-]+", text)),
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_a_user_who_is_no_admin_learns_the_bots_id_and_their_own_only(
    stack: BridgeStack, secrets_: dict[str, Any]
) -> None:
    async with nio_client(stack.synapse, stack.others["user"]) as bob:
        await bob.sync(timeout=0)
        dm = await open_dm(bob)
        welcome = bot_notices(bob, dm)
        await sync_until(bob, lambda: bool(welcome), "the bot's welcome", within=WITHIN)
        replies = [await command(bob, dm, word, WITHIN) for word in ("whoami", "ping")]
        for reply in replies:
            ids = disclosed(reply)
            assert ids["mxids"] <= {bob.user_id}, reply  # (whoami names him, ping nobody)
            assert ids | {"mxids": set()} == {
                "numbers": {str(secrets_["bot"])},
                "mxids": set(),
                "rooms": set(),
                "matrix_rooms": set(),
            }, reply
            assert "You have no Kalandra member" in reply
            assert "`user`" in reply  # their own level, nobody else's

        # Once bob has a member of his own (his portal): his id, the bot's, no one else's.
        await create_portal(bob, "bob's own")
        mine = await bridged_member_of(stack, bob.user_id)
        reply = await command(bob, dm, "whoami", WITHIN)
        assert disclosed(reply)["numbers"] == {str(secrets_["bot"]), str(mine)}, reply
        assert f"Your Kalandra member id is `{mine}`" in reply
        for other in (secrets_["alice_member"], secrets_["native"]):
            assert str(other) not in reply


@pytest.mark.asyncio(loop_scope="module")
async def test_a_relay_user_gets_the_refusal_and_no_id(
    stack: BridgeStack, secrets_: dict[str, Any]
) -> None:
    async with nio_client(stack.synapse, stack.others["relay"]) as carol:
        await carol.sync(timeout=0)
        dm = await open_dm(carol)
        notices = bot_notices(carol, dm)
        await sync_until(carol, lambda: bool(notices), "the bot's answer", within=WITHIN)
        assert notices == [REFUSAL]
        assert disclosed(notices[0]) == {
            "numbers": set(),
            "mxids": set(),
            "rooms": set(),
            "matrix_rooms": set(),
        }


def traces_of(bot: int) -> list[bytes]:
    """How the bot's identity could appear on the wire: its member id as a u64 either way
    round and in decimal, its Matrix id and its localpart."""
    return [
        struct.pack(">Q", bot),
        struct.pack("<Q", bot),
        str(bot).encode(),
        BOT.encode(),
        BOT[1:].split(":")[0].encode(),
    ]


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unauthenticated_connection_receives_nothing_of_the_bridges_identity(
    stack: BridgeStack, secrets_: dict[str, Any]
) -> None:
    received = bytearray()
    stranger = Account(member_id=0, token="not a token this server issued")

    # Ping before any Hello, then a Hello with a wrong token (the connection is then closed).
    conn = await raw(stack.tcp_port)
    try:
        ping = conn.send(Opcode.PING)
        pong = await conn.reply(ping)
        assert pong.header.opcode == Opcode.PONG
        received += pong.encode()
        hello = conn.hello_frame(stranger.token, stranger.key)
        conn.write(hello.encode())
        refusal = await conn.reply(hello.header.request_id)
        received += refusal.encode()
        assert refusal.header.opcode == Opcode.ERROR, refusal.header
        assert error_of(refusal).code == ErrorCode.NOT_AUTHORIZED
        await conn.wait_closed()
        while not conn.frames.empty():
            received += conn.frames.get_nowait().encode()
    finally:
        conn.close()

    # A Hello whose proof does not verify.
    conn = await raw(stack.tcp_port)
    try:
        hello = conn.hello_frame(stranger.token, stranger.key, proof=bytes(64))
        conn.write(hello.encode())
        error = await expect_error(conn, hello.header.request_id, ErrorCode.NOT_AUTHORIZED)
        received += error.message.encode()
        await conn.wait_closed()
        while not conn.frames.empty():
            received += conn.frames.get_nowait().encode()
    finally:
        conn.close()

    assert received  # something came back: the check below is not vacuous
    for trace in traces_of(secrets_["bot"]):
        assert trace not in received, trace


@pytest.mark.asyncio(loop_scope="module")
async def test_an_authenticated_member_gets_the_bots_ids_and_its_own_session_only(
    stack: BridgeStack, secrets_: dict[str, Any]
) -> None:
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        member = await store.create_member("outsider")
        token = await store.issue_token(member.member_id)
    finally:
        await store.close()
    outsider = Account(member.member_id, token, SigningKey.generate())
    conn = await raw(stack.tcp_port)
    try:
        reply = await conn.hello(outsider)
    finally:
        conn.close()
    assert isinstance(reply, HelloReply)
    fields = dataclasses.asdict(reply)
    assert fields.pop("bridge_member_id") == secrets_["bot"]
    assert fields.pop("bridge_mxid") == BOT
    assert fields.pop("member_id") == outsider.member_id
    assert fields.pop("device_token") is None  # a device token was used, none is issued
    assert fields.pop("challenge") is None
    fields.pop("session_id")
    fields.pop("server_key")  # the server's own public key
    assert fields.pop("capabilities") == ["kalandra-bridge", "errors", "mailbox", "sync-epochs"]
    assert fields == {}, fields  # no other field
