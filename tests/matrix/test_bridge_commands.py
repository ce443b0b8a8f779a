"""The bot's commands against a real Synapse and the bridge's real Kalandra server: room
information, rotating keys, moderation by the bot, bridging and unbridging Matrix rooms, relay
mode and device tokens; every admin-only command refused to a `user`."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from helpers.native import next_event
from helpers.sql import query
from nacl.signing import SigningKey
from nio import (
    AsyncClient,
    MatrixRoom,
    RoomCreateResponse,
    RoomGetStateEventResponse,
    RoomMemberEvent,
)
from ruamel.yaml import YAML

from bridge.appservice.handler import ENCRYPTION_OFF
from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ClientError, ServerAddress
from kalandra_core.crypto import sealed
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    create_portal,
    encrypted_dm,
    ghost_of,
    native_client,
    nio_client,
    open_dm,
    portal_with_native,
    say,
    sync_until,
    wait_history,
)

ADMINS_ONLY = "That command is limited to bridge administrators."


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("commands"),
        request.param,
        others=("user",),
        bridge_options={"relay.enabled": True},
    ) as stack:
        yield stack


async def dm_with_bot(client: AsyncClient) -> str:
    """A management room, once the bot's welcome is in (so the next notice is an answer)."""
    await client.sync(timeout=0)
    dm = await open_dm(client)
    notices = bot_notices(client, dm)
    await sync_until(client, lambda: len(notices) >= 1, "welcome from the bot")
    return dm


def state_key(stack: BridgeStack) -> bytes:
    with open(stack.config, encoding="utf-8") as fh:
        config = YAML().load(fh)
    return base64.b64decode(config["bridge"]["mls_state_key"])


@pytest.mark.asyncio(loop_scope="module")
async def test_admin_commands_are_refused_to_a_user(stack: BridgeStack) -> None:
    async with nio_client(stack.synapse, stack.others["user"]) as bob:
        dm = await dm_with_bot(bob)
        room = secrets.token_hex(16)
        for text in (
            f"kick {room} 1",
            f"ban {room} 1 spam",
            f"unban {room} 1",
            f"redact {room} 3",
            f"bridge {room}",
            "unbridge",
        ):
            assert await command(bob, dm, text) == ADMINS_ONLY, text
        answer = await command(bob, dm, "set-relay")
        assert answer.startswith("This command is for bridge admins"), answer
        answer = await command(bob, dm, "unset-relay")
        assert answer.startswith("This command is for bridge admins"), answer
        help_text = await command(bob, dm, "help")
        for name in ("members", "epoch", "sync", "rotate-keys", "device-token"):
            assert f"**{name}**" in help_text, name
        assert "**kick**" not in help_text  # admin commands are not offered to a user


@pytest.mark.asyncio(loop_scope="module")
async def test_members_epoch_sync_and_rotate_keys(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "info")
        room_id = bytes.fromhex(room_hex)
        await say(alice, portal, "hello from Matrix")  # alice becomes a bridged member
        message = await asyncio.wait_for(native.messages.get(), 60)
        puppet = message.sender_id

        roster = await command(alice, portal, "!kalandra members")
        assert roster.startswith(f"Members of `{room_hex}`"), roster
        lines = roster.splitlines()[1:]
        assert len(lines) == 3, roster
        assert any(
            line.startswith(f"* {native.core.member_id} `native_") and line.endswith(": native")
            for line in lines
        ), roster
        assert any(
            line.startswith(f"* {puppet} `mx_") and f"bridged Matrix user {alice.user_id}" in line
            for line in lines
        ), roster
        assert any("`kalandrabot`: the bridge bot (owner)" in line for line in lines), roster

        info = await command(alice, portal, "!kalandra epoch")
        match = re.search(r"epoch (\d+), cipher suite `(\w+)`, tree hash `([0-9a-f]{64})`", info)
        assert match, info
        epoch, suite, tree_hash = int(match[1]), match[2], match[3]
        assert suite == "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519"
        assert "3 members" in info
        assert epoch == native.core.rooms[room_id].epoch

        rotated = await command(alice, portal, "!kalandra rotate-keys", within=30)
        assert rotated.startswith(f"New keys in `{room_hex}`: epoch {epoch} → {epoch + 1}")
        changed = await next_event(native, ev.EpochChanged)
        assert changed.epoch == epoch + 1
        assert changed.room_id == room_id
        info = await command(alice, portal, "!kalandra epoch")
        assert f"epoch {epoch + 1}," in info, info
        assert tree_hash not in info, info

        # Messages still cross after the new epoch, both ways.
        await say(alice, portal, "after the rotation")
        message = await asyncio.wait_for(native.messages.get(), 60)
        assert message.content.body == "after the rotation"
        index = await native.send_text(room_id, "native after the rotation")
        await wait_history(alice, portal, ghost_of(native), 1)

        synced = await command(alice, portal, "!kalandra sync")
        match = re.search(r"log applied up to index (\d+)", synced)
        assert match, synced
        assert int(match[1]) >= index, synced

        # In the management room the room is named (a unique prefix will do).
        dm = await dm_with_bot(alice)
        assert (await command(alice, dm, "members")).startswith("Which Kalandra room?")
        info = await command(alice, dm, f"epoch {room_hex[:8]}")
        assert info.startswith(f"Kalandra room `{room_hex}`: epoch {epoch + 1},"), info
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_kick_ban_unban_and_redact(stack: BridgeStack) -> None:
    native = await native_client(stack)
    other = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "moderation")
        room_id = bytes.fromhex(room_hex)
        added = await command(alice, portal, f"!kalandra invite {room_hex} {other.core.member_id}")
        assert added.startswith("Added member"), added
        assert await asyncio.wait_for(other.joined.get(), 15) == room_id

        index = await native.send_text(room_id, "regrettable")
        await wait_history(alice, portal, ghost_of(native), 1)
        answer = await command(alice, portal, f"!kalandra redact {index} oops")
        assert answer.startswith(f"Redacted log index {index} of `{room_hex}`"), answer
        redacted = await next_event(other, ev.Moderated, lambda e: e.action == "redact")
        assert (redacted.action, redacted.target, redacted.reason) == ("redact", index, "oops")

        answer = await command(alice, portal, f"!kalandra kick {native.core.member_id} bye")
        assert answer.startswith(f"Kicked member {native.core.member_id}"), answer
        kicked = await next_event(native, ev.Moderated, lambda e: e.action == "kick")
        assert (kicked.action, kicked.target, kicked.reason) == (
            "kick",
            native.core.member_id,
            "bye",
        )
        left = await next_event(native, ev.Left)
        assert left.room_id == room_id

        # A Matrix user id works too: here the ghost of the other native member.
        dm = await dm_with_bot(alice)
        answer = await command(alice, dm, f"ban {room_hex} {ghost_of(other)} spam")
        assert answer.startswith(f"Banned member {other.core.member_id}"), answer
        banned = await next_event(other, ev.Moderated, lambda e: e.action == "ban")
        assert (banned.action, banned.reason) == ("ban", "spam")
        await next_event(other, ev.Left)
        answer = await command(alice, dm, f"unban {room_hex} {other.core.member_id}")
        assert answer.startswith(f"Unbanned member {other.core.member_id}"), answer
        # The server's refusal is told as it is.
        answer = await command(alice, dm, f"unban {room_hex} {other.core.member_id}")
        assert answer.startswith("The Kalandra server refused: member is not banned"), answer
        answer = await command(alice, dm, f"kick {room_hex} @nobody:localhost")
        assert answer == "@nobody:localhost is not a Kalandra member (not a ghost, not bridged)."
    await native.close()
    await other.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_unbridge_then_bridge_an_existing_room(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "moving")
        room_id = bytes.fromhex(room_hex)
        bot_left: list[str] = []

        async def on_member(room: MatrixRoom, event: RoomMemberEvent) -> None:
            if room.room_id == portal and event.state_key == BOT and event.membership == "leave":
                bot_left.append(event.event_id)

        alice.add_event_callback(on_member, RoomMemberEvent)
        answer = await command(alice, portal, "!kalandra unbridge")
        assert answer.startswith(f"Unbridging Kalandra room `{room_hex}`"), answer
        await sync_until(alice, lambda: bool(bot_left), "the bot leaving the old portal")
        state = await alice.room_get_state_event(
            portal, "m.bridge", f"org.kalandra.bridge://kalandra/{room_hex}"
        )
        assert isinstance(state, RoomGetStateEventResponse), state
        assert state.content == {}, state

        # Messages meanwhile are bridged nowhere yet: the bot, still in the Kalandra room, keeps
        # them for the next portal's history (backfill).
        await native.send_text(room_id, "while unbridged")

        created = await alice.room_create(
            name="an existing room",
            invite=[BOT],
            power_level_override={"users": {BOT: 100}},  # (room v12: not the creator)
        )
        assert isinstance(created, RoomCreateResponse), created
        room = created.room_id
        notices = bot_notices(alice, room)
        await sync_until(alice, lambda: len(notices) >= 1, "the bot's welcome")
        answer = await command(alice, room, f"!kalandra bridge {room_hex}")
        assert answer.startswith(f"This room is now the portal of Kalandra room `{room_hex}`")
        for event_type in ("m.bridge", "uk.half-shot.bridge"):
            state = await alice.room_get_state_event(
                room, event_type, f"org.kalandra.bridge://kalandra/{room_hex}"
            )
            assert isinstance(state, RoomGetStateEventResponse), state
            assert state.content["channel"]["id"] == room_hex
            assert state.content["bridgebot"] == BOT

        # Neither side can be bridged twice.
        again = await command(alice, room, f"!kalandra bridge {room_hex}")
        assert again.startswith("This Matrix room is a portal already"), again
        other = await alice.room_create(invite=[BOT])
        assert isinstance(other, RoomCreateResponse), other
        notices = bot_notices(alice, other.room_id)
        await sync_until(alice, lambda: len(notices) >= 1, "the bot's welcome")
        again = await command(alice, other.room_id, f"!kalandra bridge {room_hex}")
        assert again == f"Kalandra room `{room_hex}` is bridged already, to {room}.", again

        await native.send_text(room_id, "in the new portal")
        seen = await wait_history(alice, room, ghost_of(native), 2)
        assert [body for _, body in seen] == ["while unbridged", "in the new portal"]
        # The old portal gets nothing more. No marker shows that: the two portals' queues
        # toward Matrix run independently (two Matrix rooms have no order between them), so
        # this one is a wait.
        await asyncio.sleep(2)
        assert [b for _, b in await wait_history(alice, portal, ghost_of(native), 0)] == []
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_set_and_unset_relay(stack: BridgeStack) -> None:
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await create_portal(alice, "relay")
        answer = await command(alice, portal, "!kalandra set-relay")
        assert answer.startswith("Relay mode is on"), answer
        assert await command(alice, portal, "!kalandra set-relay") == (
            "Relay mode is already on in this portal."
        )
        rows = await query(
            stack.store_url,
            "SELECT relay_enabled, relay_mxid FROM bridge_portals WHERE room_id = :r",
            r=bytes.fromhex(room_hex),
        )
        assert [(bool(a), b) for a, b in rows] == [(True, alice.user_id)]
        answer = await command(alice, portal, "!kalandra unset-relay")
        assert answer == "Relay mode is off in this portal.", answer
        rows = await query(
            stack.store_url,
            "SELECT relay_enabled, relay_mxid FROM bridge_portals WHERE room_id = :r",
            r=bytes.fromhex(room_hex),
        )
        assert [(bool(a), b) for a, b in rows] == [(False, None)]
        dm = await dm_with_bot(alice)
        assert await command(alice, dm, "set-relay") == "Run this command in a portal room."


@pytest.mark.asyncio(loop_scope="module")
async def test_device_token_list_and_revoke_and_no_code_without_encryption(
    stack: BridgeStack,
) -> None:
    """Login codes come only in an end-to-end encrypted chat with the bot (this bridge has no
    encryption: refused, see tests/security/test_bridge_matrix_users.py for the encrypted
    case); `list` and `revoke` manage the member's device tokens anywhere with the bot."""
    address = ServerAddress("tcp", "127.0.0.1", stack.tcp_port)
    async with nio_client(stack.synapse, stack.others["user"]) as bob:
        # Never in a portal (the code would be shown to the room).
        _, portal = await create_portal(bob, "no tokens here")
        answer = await command(bob, portal, "!kalandra device-token")
        assert (
            answer
            == "Login codes are only given in an end-to-end encrypted direct chat with the bot."
        )

        dm = await dm_with_bot(bob)
        answer = await command(bob, dm, "device-token")
        assert answer.startswith("This bridge has no end-to-end encryption"), answer
        assert "klc_" not in answer
        answer = await command(bob, dm, "device-token list")  # makes the member
        match = re.fullmatch(r"Member (\d+) has no device token from you\.", answer)
        assert match, answer
        member_id = int(match[1])

        rows = await query(
            stack.store_url,
            "SELECT member_id, signing_key FROM bridge_users WHERE mxid = :m",
            m=bob.user_id,
        )
        assert len(rows) == 1
        assert rows[0][0] % (1 << 64) == member_id
        key = sealed.unseal(state_key(stack), "user-signing-key", bytes(rows[0][1]))

        # A login code (as the provisioning API gives it) logs in only with the member's key
        # (the bridge's): a client bringing its own key is refused, as the help says...
        status, issued = await provisioning_code(stack, bob.user_id)
        assert status == 200, issued
        own_key = bytes(SigningKey.generate())
        fresh = Client(ClientCore(0, own_key), address, issued["login_code"], reconnect=False)
        with pytest.raises(ClientError, match="signature key does not match"):
            await fresh.connect()
        await fresh.close()
        # ... and with the key, it becomes a device token the commands list and revoke.
        status, issued = await provisioning_code(stack, bob.user_id)
        client = Client(ClientCore(member_id, key), address, issued["login_code"], reconnect=False)
        await client.connect()
        assert client.core.member_id == member_id
        await client.close()
        listed = await command(bob, dm, "device-token list")
        token_ids = re.findall(r"\* `([0-9a-f]{12})`", listed)
        assert len(token_ids) == 1, listed
        token_id = token_ids[0]
        answer = await command(bob, dm, f"device-token revoke {token_id[:8]}")
        assert answer.startswith(f"Revoked device token `{token_id}` of member {member_id}.")
        assert f"`{token_id}`" not in await command(bob, dm, "device-token list")
        with pytest.raises(ClientError, match="unknown or revoked device token"):
            await client.connect()
        await client.close()


async def provisioning_code(stack: BridgeStack, user_id: str) -> tuple[int, dict[str, Any]]:
    config = YAML(typ="safe").load(stack.config.read_text(encoding="utf-8"))
    secret = config["bridge"]["provisioning"]["shared_secret"]
    url = f"http://127.0.0.1:{stack.as_port}/_matrix/provision/v1/login-code"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url, params={"user_id": user_id}, headers={"Authorization": f"Bearer {secret}"}
        ) as response,
    ):
        return response.status, await response.json()


@pytest.mark.asyncio(loop_scope="module")
async def test_an_encrypted_chat_without_encryption_says_what_the_operator_must_do(
    stack: BridgeStack,
) -> None:
    async with nio_client(stack.synapse, stack.others["user"], encrypted=True) as bob:
        await bob.sync(timeout=0)
        dm = await encrypted_dm(bob)
        notices = bot_notices(bob, dm)
        await sync_until(bob, lambda: len(notices) >= 1, "welcome from the bot")
        answer = await command(bob, dm, "ping")  # encrypted: the bridge cannot read it
        assert answer == ENCRYPTION_OFF  # a notice (bot_notices), in clear: nothing else works
        assert "`bridge.encryption.allow: true`" in answer
