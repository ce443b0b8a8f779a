"""Matrix users and what the bridge lets them do as Kalandra members, against a real Synapse
(nio clients, native Kalandra clients, the bridge as a process), on SQLite and PostgreSQL:

- a redaction is carried to Kalandra only from the message's sender or someone with the power
  to redact in the portal (the bridge reads the power levels itself);
- a Kalandra account named like a bridged user is never adopted unless the bridge made it, and
  two Matrix users never share a member name;
- `device-token` gives a single-use login code, and only in an end-to-end encrypted chat;
- a user who loses the ``user`` permission loses their member's place in the room (a Remove
  commit, at a restart or a SIGHUP) and nothing more goes out as them.

One stack per database for the module; the demotion test restarts the bridge and comes last.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import sqlalchemy as sa
from helpers.native import next_event, next_from_others
from matrix.bridge_members import epoch_state, wait_until
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    PASSWORD,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    encrypted_dm,
    native_client,
    nio_client,
    open_dm,
    portal_with_native,
    room_history,
    say,
    sync_until,
)
from nio import AsyncClient, MatrixRoom, RoomMessageNotice, RoomRedactResponse
from ruamel.yaml import YAML
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.members.bridged_users import member_name
from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ClientError, ServerAddress
from kalandra_core.client.events import Message
from kalandra_core.crypto import sealed
from kalandra_core.proto import Opcode
from kalandra_core.storage.sql import SqlStore
from kalandra_core.storage.urls import sqlalchemy_url

WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    # Everyone registered has `user` unless the config says otherwise.
    # (Encryption allowed: the login code test needs an encrypted chat with the bot.)
    async with bridge_stack(
        tmp_path_factory.mktemp("matrix-users"),
        request.param,
        default_level="user",
        bridge_options={"encryption.allow": True},
    ) as stack:
        yield stack


def first_other_message(client: Client) -> asyncio.Task[Message]:
    """The next message ``client`` gets from someone else, whatever it is."""

    async def wait() -> Message:
        while True:
            message = await client.messages.get()
            if message.sender_id != client.core.member_id:
                return message

    return asyncio.create_task(asyncio.wait_for(wait(), WITHIN))


async def new_user(stack: BridgeStack, localpart: str) -> str:
    await stack.synapse.register_user(localpart, PASSWORD)
    return f"@{localpart}:localhost"


async def join_portal(alice: AsyncClient, user: AsyncClient, portal: str) -> None:
    await alice.room_invite(portal, user.user_id)
    await user.join(portal)
    await sync_until(user, lambda: portal in user.rooms, "the join")


async def store_of(stack: BridgeStack) -> SqlStore:
    return await SqlStore.open(stack.store_url, migrate=False)


async def member_of(stack: BridgeStack, mxid: str) -> int | None:
    """The member id the bridge holds for ``mxid`` (its own table; u64 stored signed)."""
    engine = create_async_engine(sqlalchemy_url(stack.store_url))
    try:
        async with engine.connect() as conn:
            value = await conn.scalar(
                sa.text("SELECT member_id FROM bridge_users WHERE mxid = :m"), {"m": mxid}
            )
    finally:
        await engine.dispose()
    return None if value is None else int(value) % (1 << 64)


async def put_transaction(stack: BridgeStack, events: list[dict[str, Any]]) -> None:
    """Deliver ``events`` to the bridge as Synapse does: an appservice transaction with the
    hs_token."""
    config = YAML(typ="safe").load(stack.config.read_text(encoding="utf-8"))
    headers = {"Authorization": f"Bearer {config['appservice']['hs_token']}"}
    path = f"/_matrix/app/v1/transactions/fed-{secrets.token_hex(6)}"
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"http://127.0.0.1:{stack.as_port}{path}", json={"events": events}, headers=headers
        ) as r,
    ):
        assert r.status == 200, await r.text()


@pytest.mark.asyncio(loop_scope="module")
async def test_redaction_of_anothers_message_without_redact_power_is_not_carried(
    stack: BridgeStack,
) -> None:
    """Bob (bridge permission `user`, Matrix power 0 in the portal) redacts a message of
    Alice's. A local Synapse refuses that (403), but in room versions 3 and later Synapse
    stores such a redaction when it comes from another server and delivers it to appservices
    (it only hides its effect): the test hands the bridge that redaction as Synapse would, in
    an appservice transaction with the hs_token. Nothing may reach Kalandra: no Redact frame,
    the message intact in the log, and a notice in the portal says it was not carried. Bob's
    redaction of his own message and Alice's (power 100) of someone else's still are."""
    native = await native_client(stack)
    bob_mxid = await new_user(stack, f"bob_{secrets.token_hex(3)}")
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, bob_mxid[1:].split(":")[0]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "redactions")
        room = bytes.fromhex(room_hex)
        await join_portal(alice, bob, portal)
        alices = await say(alice, portal, "alice's words")
        alices_index = (await next_from_others(native, "alice's words")).log_index
        bobs = await say(bob, portal, "bob's words")
        bobs_index = (await next_from_others(native, "bob's words")).log_index
        natives_index = await native.send_text(room, "native words")

        await alice.sync(timeout=0)
        notices = bot_notices(alice, portal)
        forged = {
            "type": "m.room.redaction",
            "room_id": portal,
            "sender": bob.user_id,
            "event_id": f"$remote-redaction-{secrets.token_hex(8)}",
            "origin_server_ts": int(time.time() * 1000),
            "redacts": alices,  # room versions before 11
            "content": {"redacts": alices, "reason": "not mine to erase"},
        }
        await put_transaction(stack, [forged])  # answered once the event is handled
        await sync_until(alice, lambda: bool(notices), "the bot's notice")
        assert notices[0].startswith("Not bridged to Kalandra: a redaction of someone else's")

        # The sender's own, and a moderator's, are carried (the queue is ordered: had the
        # forged one gone out, its Redact would come first).
        redacted = await bob.room_redact(portal, bobs, reason="mine")
        assert isinstance(redacted, RoomRedactResponse), redacted
        first = await next_event(native, ev.Moderated)
        assert (first.action, first.target, first.reason) == ("redact", bobs_index, "mine")
        ghost_event = await wait_ghost_event(alice, portal, "native words")
        redacted = await alice.room_redact(portal, ghost_event, reason="moderation")
        assert isinstance(redacted, RoomRedactResponse), redacted
        second = await next_event(native, ev.Moderated)
        assert (second.action, second.target) == ("redact", natives_index)

        store = await store_of(stack)
        try:
            frames = await store.load_frames(room, 0, 10_000)
        finally:
            await store.close()
        redacts = [f for f in frames if f.opcode == Opcode.REDACT]
        assert len(redacts) == 2, [f.log_index for f in redacts]
        by_index = {f.log_index: f for f in frames}
        assert by_index[alices_index].payload is not None  # Alice's message is still there
        assert by_index[bobs_index].payload is None
    await native.close()


async def wait_ghost_event(client: AsyncClient, room_id: str, body: str) -> str:
    async with asyncio.timeout(WITHIN):
        while True:
            for event in await room_history(client, room_id):
                if getattr(event, "body", None) == body:
                    return str(event.event_id)
            await asyncio.sleep(0.5)


@pytest.mark.asyncio(loop_scope="module")
async def test_mx_account_made_by_someone_else_is_not_adopted_and_names_do_not_collide(
    stack: BridgeStack,
) -> None:
    """An operator (or anyone able to make accounts) creates the account the bridge would name
    after Dave, and keeps a device token for it, before Dave first speaks. The bridge must not
    make that account Dave's member: Dave gets a fresh one, and the pre-made account stays
    unbound. Two Matrix users whose ids once mapped to one name (`x_y` and `x=y`) get two
    members, each named after its own MXID."""
    tag = secrets.token_hex(3)
    dave = await new_user(stack, f"dave_{tag}")
    twins = [await new_user(stack, f"t{tag}_y"), await new_user(stack, f"t{tag}=y")]
    store = await store_of(stack)
    try:
        planted = await store.create_member(member_name(dave))
        await store.issue_token(planted.member_id)  # the planter's way in, were it adopted
    finally:
        await store.close()

    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        _, portal = await portal_with_native(alice, native, "names")
        senders = {}
        for mxid in (dave, *twins):
            async with nio_client(stack.synapse, mxid[1:].split(":")[0]) as user:
                await join_portal(alice, user, portal)
                await say(user, portal, f"hello from {mxid}")
                senders[mxid] = (await next_from_others(native, f"hello from {mxid}")).sender_id
    await native.close()

    assert senders[dave] != planted.member_id
    assert await member_of(stack, dave) == senders[dave]
    assert len(set(senders.values())) == 3
    store = await store_of(stack)
    try:
        unbound = await store.get_member(planted.member_id)
        assert unbound is not None
        assert unbound.signature_key is None
        for mxid in twins:
            account = await store.get_member(senders[mxid])
            assert account is not None
            assert account.name == member_name(mxid)
            assert await member_of(stack, mxid) == senders[mxid]
    finally:
        await store.close()


async def table_counts(stack: BridgeStack) -> tuple[int, int]:
    """(login codes, device tokens) stored."""
    engine = create_async_engine(sqlalchemy_url(stack.store_url))
    try:
        async with engine.connect() as conn:
            codes = await conn.scalar(sa.text("SELECT COUNT(*) FROM login_codes"))
            tokens = await conn.scalar(sa.text("SELECT COUNT(*) FROM device_tokens"))
    finally:
        await engine.dispose()
    return int(codes or 0), int(tokens or 0)


async def bridged_key(stack: BridgeStack, mxid: str) -> bytes:
    """The device signing key the bridge holds for ``mxid``'s member (unsealed)."""
    engine = create_async_engine(sqlalchemy_url(stack.store_url))
    try:
        async with engine.connect() as conn:
            sealed_key = await conn.scalar(
                sa.text("SELECT signing_key FROM bridge_users WHERE mxid = :m"), {"m": mxid}
            )
    finally:
        await engine.dispose()
    config = YAML(typ="safe").load(stack.config.read_text(encoding="utf-8"))
    state_key = base64.b64decode(config["bridge"]["mls_state_key"])
    return sealed.unseal(state_key, "user-signing-key", bytes(sealed_key))


async def welcomed(client: AsyncClient, room_id: str) -> None:
    notices = bot_notices(client, room_id)
    await sync_until(client, lambda: bool(notices), "the bot's welcome")


async def provisioning(stack: BridgeStack, path: str, user: str, secret: str) -> Any:
    url = f"http://127.0.0.1:{stack.as_port}/_matrix/provision/v1{path}"
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, params={"user_id": user}, headers=headers) as response,
    ):
        return response.status, await response.json()


@pytest.mark.asyncio(loop_scope="module")
async def test_device_token_puts_no_secret_in_an_unencrypted_chat_and_codes_redeem_once(
    stack: BridgeStack,
) -> None:
    """Frank asks the bot for `device-token` in an unencrypted direct chat: refused with an
    explanation, and nothing is issued (no login code, no device token, not even a member).
    In an end-to-end encrypted direct chat he gets a single-use login code in an encrypted
    notice (never in the bridge's log); a client holding the member's key exchanges it for a
    device token once, and a second exchange fails. `device-token list` and `revoke` manage
    the device token that came of it. The provisioning API gives a code for a user with the
    shared secret only, and that code also redeems once."""
    frank = await new_user(stack, f"frank_{secrets.token_hex(3)}")
    address = ServerAddress("tcp", "127.0.0.1", stack.tcp_port)
    before = await table_counts(stack)
    async with nio_client(stack.synapse, frank[1:].split(":")[0], encrypted=True) as client:
        plain = await open_dm(client)
        await welcomed(client, plain)
        answer = await command(client, plain, "device-token")
        assert answer.startswith("A login code is a secret, and this chat is not end-to-end")
        assert "klc_" not in answer
        assert await table_counts(stack) == before
        assert await member_of(stack, frank) is None

        dm = await encrypted_dm(client)
        await welcomed(client, dm)
        await client.sync(timeout=0)
        replies: list[RoomMessageNotice] = []

        async def on_notice(room: MatrixRoom, event: RoomMessageNotice) -> None:
            if room.room_id == dm and event.sender == BOT:
                replies.append(event)

        client.add_event_callback(on_notice, RoomMessageNotice)
        await say(client, dm, "device-token")
        await sync_until(client, lambda: bool(replies), "the login code", within=WITHIN)
        assert replies[0].decrypted, "the code came in a plaintext event"
        match = re.search(r"Kalandra member (\d+).*?(klc_[a-z2-7]{21})", replies[0].body, re.S)
        assert match, replies[0].body
        member_id, code = int(match[1]), match[2]
        assert member_id == await member_of(stack, frank)
        assert code not in stack.log.read_text(errors="replace")

        key = await bridged_key(stack, frank)
        native = Client(ClientCore(member_id, key), address, code, reconnect=False)
        await native.connect()
        assert native.core.member_id == member_id
        await native.close()
        again = Client(ClientCore(member_id, key), address, code, reconnect=False)
        with pytest.raises(ClientError, match="unknown, used or expired login code"):
            await again.connect()
        await again.close()

        listed = await command(client, dm, "device-token list")
        ids = re.findall(r"\* `([0-9a-f]{12})`", listed)
        assert len(ids) == 1, listed
        answer = await command(client, dm, f"device-token revoke {ids[0]}")
        assert answer.startswith(f"Revoked device token `{ids[0]}`"), answer

    config = YAML(typ="safe").load(stack.config.read_text(encoding="utf-8"))
    secret = config["bridge"]["provisioning"]["shared_secret"]
    counts = await table_counts(stack)
    status, body = await provisioning(stack, "/login-code", frank, secret + "x")
    assert status == 401, body
    assert await table_counts(stack) == counts
    status, body = await provisioning(stack, "/login-code", frank, secret)
    assert status == 200, body
    assert (body["member_id"], body["expires_in"]) == (member_id, 600)
    store = await store_of(stack)
    try:
        now_ms = int(time.time() * 1000)
        assert await store.redeem_login_code(body["login_code"], now_ms) == member_id
        assert await store.redeem_login_code(body["login_code"], now_ms) is None
    finally:
        await store.close()


def set_permission(stack: BridgeStack, mxid: str, level: str) -> None:
    yaml = YAML()
    config = yaml.load(stack.config.read_text(encoding="utf-8"))
    config["bridge"]["permissions"][mxid] = level
    with open(stack.config, "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)


@pytest.mark.asyncio(loop_scope="module")
async def test_demoted_user_loses_their_member_and_is_no_longer_bridged_as_themselves(
    stack: BridgeStack,
) -> None:
    """Carol and Erin speak in a portal (each becomes an MLS member). Erin is demoted to
    `relay` in the config and the bridge gets SIGHUP; Carol is demoted while the bridge is
    down. Each one's member is removed from the room (a Remove commit the native member sees,
    and the roster in its view no longer has them), and what they say next is not bridged as
    them (relaying is off here: not at all)."""
    tag = secrets.token_hex(3)
    carol, erin = await new_user(stack, f"carol_{tag}"), await new_user(stack, f"erin_{tag}")
    native = await native_client(stack)
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, carol[1:].split(":")[0]) as carol_client,
        nio_client(stack.synapse, erin[1:].split(":")[0]) as erin_client,
    ):
        room_hex, portal = await portal_with_native(alice, native, "demotion")
        room = bytes.fromhex(room_hex)
        members = {}
        for client in (carol_client, erin_client):
            await join_portal(alice, client, portal)
            await say(client, portal, f"{client.user_id} speaking")
            message = await next_from_others(native, f"{client.user_id} speaking")
            members[client.user_id] = message.sender_id
        await native.settle()
        roster = native.core.rooms[room].roster()
        assert members[carol] in roster
        assert members[erin] in roster

        # Erin: demoted in the config, and the bridge reloads it.
        set_permission(stack, erin, "relay")
        assert stack.bridge is not None
        stack.bridge.send_signal(signal.SIGHUP)
        removal = await next_event(native, ev.EpochChanged, lambda e: members[erin] in e.removed)
        # The portal shows it before the bridge stops (a stop before that is the subject of
        # tests/faults/test_bot_commit_restart.py).
        await wait_until(
            lambda: epoch_reached(alice, portal, removal.epoch), "the removal in the portal"
        )
        # Carol: demoted in the config without a reload; the restart applies it.
        set_permission(stack, carol, "relay")
        await stack.stop_bridge()
        await stack.restart()
        await next_event(native, ev.EpochChanged, lambda e: members[carol] in e.removed)
        await native.settle()
        roster = native.core.rooms[room].roster()
        assert members[carol] not in roster
        assert members[erin] not in roster

        # They speak again: refused (notices), nothing reaches Kalandra; Alice still does.
        await alice.sync(timeout=0)
        notices = bot_notices(alice, portal)
        got = first_other_message(native)
        for client in (carol_client, erin_client):
            await say(client, portal, f"{client.user_id} after demotion")
        await sync_until(alice, lambda: len(notices) >= 2, "two refusals")
        assert all(n.startswith("Not bridged to Kalandra") for n in notices), notices
        await say(alice, portal, "alice after the demotions")
        assert (await got).content.body == "alice after the demotions"
    await native.close()


async def epoch_reached(client: AsyncClient, portal: str, epoch: int) -> bool:
    state = await epoch_state(client, portal)
    return state is not None and state["epoch"] >= epoch
