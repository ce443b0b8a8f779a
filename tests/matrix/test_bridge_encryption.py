"""Encrypted portals (end-to-bridge encryption) against a real Synapse: the Matrix user is a
matrix-nio client with E2EE (vodozemac), the bridge's bot has its own device (mautrix.crypto,
python-olm, MSC2409/MSC3202/MSC4190). Asserted is what each side sees: the native member the
Matrix user's text, the Matrix user the ghost's messages decrypted (RoomMessageText, never a
MegolmEvent), status events and notices for what the bridge could not decrypt, and messages
whose room keys were lost while the bridge was down bridged once, in order, once the keys came.

nio shares room keys with its own devices only, and keeps other users' key requests from its
to-device callbacks (its Olm machine takes them and drops them); Element also answers a key
request from a device it shared the session with before. ``answer_key_requests`` gives the
test's device that behaviour, with nio's own Olm machinery, reading the requests from each sync
response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from helpers.sql import query
from nio import (
    AsyncClient,
    MegolmEvent,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomKeyRequest,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)
from ruamel.yaml import YAML

from bridge.encryption import e2ee
from bridge.portal import relations
from kalandra_core.client import events as ev
from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    ghost_of,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    say,
    sync_until,
)
from matrix.test_bridge_relations import native_member

WITHIN = 60.0
REPORTS = {"m.room.message", "com.beeper.message_send_status"}  # the bot's failure reports


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("encryption"),
        request.param,
        bridge_options={"encryption.allow": True, "encryption.default": True},
    ) as stack:
        yield stack


async def decrypted_texts(client: AsyncClient, room_id: str, sender: str) -> list[Any]:
    """The sender's messages in the room as ``client`` sees them: decrypted RoomMessageText, or
    MegolmEvent for what it could not decrypt."""
    return [
        event
        for event in await room_history(client, room_id)
        if isinstance(event, RoomMessageText | MegolmEvent) and event.sender == sender
    ]


async def wait_decrypted(
    client: AsyncClient, room_id: str, sender: str, count: int
) -> list[RoomMessageText]:
    """Waits until the sender's last ``count`` messages are decrypted; returns all of them."""
    async with asyncio.timeout(WITHIN):
        while True:
            seen = await decrypted_texts(client, room_id, sender)
            if len(seen) >= count and all(isinstance(e, RoomMessageText) for e in seen):
                return seen
            await asyncio.sleep(0.5)


async def receive(native: Any, into: list[Message], count: int, room: bytes) -> None:
    await asyncio.wait_for(messages_from_others(native, into, count, room), WITHIN)


@contextlib.asynccontextmanager
async def syncing(client: AsyncClient) -> AsyncIterator[None]:
    """``client`` syncs in the background (it answers to-device requests meanwhile)."""

    async def loop() -> None:
        while True:
            response = await client.sync(timeout=500)
            await client.run_response_callbacks([response])  # as nio's sync_forever does
            await client.send_to_device_messages()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        if task.done():
            task.result()  # its failure, if it stopped
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def answer_key_requests(
    client: AsyncClient, answering: Callable[[], bool] = lambda: True
) -> list[RoomKeyRequest]:
    """The bot's room key requests to ``client``, answered with a forwarded key (as Element
    does for a device the session was shared with) while ``answering()``; kept, answered or
    not, so a test can answer them later with :func:`forward_key`."""
    requests: list[RoomKeyRequest] = []

    async def on_sync(response: SyncResponse) -> None:
        for event in response.to_device_events:
            if not isinstance(event, RoomKeyRequest) or event.sender != BOT:
                continue
            requests.append(event)
            if answering():
                await forward_key(client, event)

    # Response callbacks run for the syncs of :func:`syncing`.
    client.add_response_callback(on_sync, SyncResponse)
    return requests


async def forward_key(client: AsyncClient, request: RoomKeyRequest) -> None:
    olm = client.olm
    assert olm is not None
    session = olm.inbound_group_store.get(request.room_id, request.sender_key, request.session_id)
    assert session is not None, "a key request for a session this device does not have"
    device = client.device_store[request.sender][request.requesting_device_id]
    olm_session = olm.session_store.get(device.curve25519)
    assert olm_session is not None, "no Olm session with the bridge's device"
    message = olm._encrypt_forwarding_key(request.room_id, session, olm_session, device)
    await client.to_device(message)


async def bot_devices(client: AsyncClient) -> set[str]:
    """The bot's devices as the homeserver lists them to ``client``."""
    response = await client.send(
        "POST",
        "/_matrix/client/v3/keys/query",
        json.dumps({"device_keys": {BOT: []}}),
        headers={"Authorization": f"Bearer {client.access_token}"},
    )
    assert response.status == 200, await response.text()
    return set((await response.json())["device_keys"].get(BOT, {}))


@pytest.mark.asyncio(loop_scope="module")
async def test_messages_both_ways_in_an_encrypted_portal(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "secret")
        assert alice.rooms[portal].encrypted  # created with m.room.encryption
        room_id = bytes.fromhex(room_hex)

        await say(alice, portal, "hello from Matrix")
        got: list[Message] = []
        await receive(native, got, 1, room_id)
        assert [m.content.body for m in got] == ["hello from Matrix"]
        # What went over Synapse was encrypted (the bridge could read it: it is a member).
        sent = await decrypted_texts(alice, portal, alice.user_id)
        assert sent
        assert all(getattr(e, "decrypted", False) for e in sent)

        await native.send_text(room_id, "hello from Kalandra")
        await native.send_text(room_id, "and again")
        seen = await wait_decrypted(alice, portal, ghost_of(native), 2)
        assert [e.body for e in seen] == ["hello from Kalandra", "and again"]
        assert all(e.decrypted for e in seen)  # were m.room.encrypted in the room

        # discard-megolm-session: the next message uses a new outbound session.
        answer = await command(alice, portal, "!kalandra discard-megolm-session")
        assert answer.startswith("Discarded the outbound Megolm session"), answer
        await native.send_text(room_id, "new session")
        seen = await wait_decrypted(alice, portal, ghost_of(native), 3)
        assert [e.body for e in seen] == ["hello from Kalandra", "and again", "new session"]
        assert seen[0].session_id == seen[1].session_id != seen[2].session_id
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_keys_lost_while_down_are_requested_again(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "while down")
        room_id = bytes.fromhex(room_hex)
        await say(alice, portal, "before")
        got: list[Message] = []
        await receive(native, got, 1, room_id)
        devices = await bot_devices(alice)
        assert len(devices) == 1, devices

        # A new device of the user sends while the bridge is down: its room key, a to-device
        # event, is lost (Synapse replays transactions with their room events only).
        await stack.stop_bridge()
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            answer_key_requests(phone)
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            await say(phone, portal, "sent while the bridge was down")
            await say(phone, portal, "and a second one")
            async with syncing(phone):
                await stack.restart()
                await receive(native, got, 3, room_id)
                await say(phone, portal, "after the restart")
                await receive(native, got, 4, room_id)
        assert [m.content.body for m in got] == [
            "before",
            "sent while the bridge was down",
            "and a second one",
            "after the restart",
        ]
        # The bot kept its device, and its messages still decrypt.
        assert await bot_devices(alice) == devices
        await native.send_text(room_id, "after the restart too")
        seen = await wait_decrypted(alice, portal, ghost_of(native), 1)
        assert [e.body for e in seen] == ["after the restart too"]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_undecryptable_message_fails_visibly_then_is_bridged_when_the_key_comes(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "lost keys")
        room_id = bytes.fromhex(room_hex)
        await stack.stop_bridge()
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            answering = [False]  # (from the manual forward below: each request)
            requests = answer_key_requests(phone, answering=lambda: answering[0])
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            lost = await say(phone, portal, "its key is lost")
            await phone.sync(timeout=0)
            notices = bot_notices(phone, portal)
            async with syncing(phone):
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while not notices:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
            assert notices[0].startswith("Not bridged to Kalandra: the bridge could not decrypt")
            history = await room_history(phone, portal)
            from_bot = [
                e
                for e in history
                if e.sender == BOT
                and e.source.get("content", {}).get("status") != "PENDING"  # (a slow queue)
                and (
                    e.source.get("type") == "com.beeper.message_send_status"
                    or str(e.source.get("content", {}).get("body")).startswith("Not bridged")
                )
            ]
            # The notice and the status event were encrypted too, and decrypt.
            assert sorted(e.source["type"] for e in from_bot) == sorted(REPORTS), history
            assert all(getattr(e, "decrypted", False) for e in from_bot), from_bot
            statuses = [
                e.source["content"]
                for e in from_bot
                if e.source["type"] == "com.beeper.message_send_status"
            ]
            assert [(s["m.relates_to"]["event_id"], s["status"]) for s in statuses] == [
                (lost, "FAIL_RETRIABLE")  # (sent again, it would carry its key)
            ], statuses
            assert statuses[0]["reason"] == "com.beeper.undecryptable_event"
            assert requests, "the bridge did not ask for the key"

            # The key comes after all: the message is bridged then, once.
            async with syncing(phone):
                # Synapse drops to-device events to an appservice it still thinks down: if
                # this forward is lost so, the bridge asks again, and that is answered too.
                answering[0] = True
                await forward_key(phone, requests[0])
                got: list[Message] = []
                await receive(native, got, 1, room_id)
                await say(phone, portal, "next")
                await receive(native, got, 2, room_id)
            assert [m.content.body for m in got] == ["its key is lost", "next"]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_bridging_an_existing_encrypted_room(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "moves")
        room_id = bytes.fromhex(room_hex)
        answer = await command(alice, portal, "!kalandra unbridge")
        assert answer.startswith(f"Unbridging Kalandra room `{room_hex}`"), answer

        created = await alice.room_create(
            name="an encrypted room",
            invite=[BOT],
            initial_state=[
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ],
            power_level_override={"users": {BOT: 100}},  # (room v12: not the creator)
        )
        assert isinstance(created, RoomCreateResponse), created
        room = created.room_id
        notices = bot_notices(alice, room)
        await sync_until(alice, lambda: len(notices) >= 1, "the bot's welcome")
        assert alice.rooms[room].encrypted
        answer = await command(alice, room, f"!kalandra bridge {room_hex}")
        assert answer.startswith(f"This room is now the portal of Kalandra room `{room_hex}`")

        await native.send_text(room_id, "into the encrypted room")
        seen = await wait_decrypted(alice, room, ghost_of(native), 1)
        assert [e.body for e in seen] == ["into the encrypted room"]
        await say(alice, room, "out of the encrypted room")
        got: list[Message] = []
        await receive(native, got, 1, room_id)
        assert [m.content.body for m in got] == ["out of the encrypted room"]
    await native.close()


def reports_about(history: list[Any], event_id: str) -> tuple[list[str], list[str], int]:
    """The bot's statuses (in order) and notices about ``event_id`` still shown, and how many
    of the bot's events were redacted."""
    statuses, notices, redacted = [], [], 0
    for event in history:
        if event.sender != BOT:
            continue
        if "redacted_because" in event.source.get("unsigned", {}):
            redacted += 1
            continue
        content = event.source.get("content", {})
        if content.get("m.relates_to", {}).get("event_id") != event_id:
            continue
        if event.source.get("type") == "com.beeper.message_send_status":
            if content["status"] != "PENDING":  # (a slow queue shows one first)
                statuses.append(content["status"])
        elif str(content.get("body")).startswith("Not bridged"):
            notices.append(content["body"])
    return statuses, notices, redacted


@pytest.mark.asyncio(loop_scope="module")
async def test_a_key_that_comes_after_a_restart_bridges_its_message_and_withdraws_the_failure(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "keys after a restart")
        room_id = bytes.fromhex(room_hex)
        await stack.stop_bridge()
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            answering = [False]  # (from the manual forward below: each request)
            requests = answer_key_requests(phone, answering=lambda: answering[0])
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            lost = await say(phone, portal, "its key comes after a restart")
            await phone.sync(timeout=0)
            notices = bot_notices(phone, portal)
            async with syncing(phone):
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while not notices or not requests:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
                # A further restart: the bridge still waits for the key, and asks again.
                await stack.stop_bridge()
                asked = len(requests)
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while len(requests) == asked:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
                # Synapse drops to-device events to an appservice it still thinks down: if
                # this forward is lost so, the bridge asks again, and that is answered too.
                answering[0] = True
                await forward_key(phone, requests[-1])
                got: list[Message] = []
                await receive(native, got, 1, room_id)
                await say(phone, portal, "next")
                await receive(native, got, 2, room_id)
            assert [m.content.body for m in got] == ["its key comes after a restart", "next"]
            # Element stops showing it failed: the failure reports are withdrawn, and the last
            # status says it was delivered.
            async with asyncio.timeout(WITHIN):
                while True:
                    history = await room_history(phone, portal)
                    statuses, shown, redacted = reports_about(history, lost)
                    if statuses and statuses[-1] == "SUCCESS":
                        break
                    await asyncio.sleep(0.5)
            assert statuses == ["SUCCESS"], statuses
            assert shown == [], shown
            # The failure notice and the failure status (and, on a slow queue, the PENDING
            # status of the same failed attempt before them).
            assert 2 <= redacted <= 3, redacted


@pytest.mark.asyncio(loop_scope="module")
async def test_a_reaction_to_a_message_whose_key_comes_late_is_bridged_after_it(
    stack: BridgeStack,
) -> None:
    # nio and Element send m.reaction unencrypted: it is handled at once, while its target still
    # waits for its room key (across a further restart here). It must follow its target.
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_id, portal, got = await first_bridged(alice, native, "late reaction")
        await stack.stop_bridge()
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            answering = [False]  # (from the manual forward below: each request)
            requests = answer_key_requests(phone, answering=lambda: answering[0])
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            target = await say(phone, portal, "its key comes late")
            await phone.sync(timeout=0)
            relates = {"rel_type": "m.annotation", "event_id": target, "key": "late"}
            sent = await phone.room_send(portal, "m.reaction", {"m.relates_to": relates})
            assert isinstance(sent, RoomSendResponse), sent
            # A reply from another device, whose key the bridge has: it follows its target too.
            answer = {
                "msgtype": "m.text",
                "body": "a reply to it",
                "m.relates_to": {"m.in_reply_to": {"event_id": target}},
            }
            replied = await alice.room_send(
                portal, "m.room.message", answer, ignore_unverified_devices=True
            )
            assert isinstance(replied, RoomSendResponse), replied
            notices = bot_notices(phone, portal)
            async with syncing(phone):
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while not notices or not requests:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
                await stack.stop_bridge()  # the reaction waits with its target
                asked = len(requests)
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while len(requests) == asked:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
                # Synapse drops to-device events to an appservice it still thinks down: if
                # this forward is lost so, the bridge asks again, and that is answered too.
                answering[0] = True
                await forward_key(phone, requests[-1])
                await receive(native, got, 3, room_id)
                reacted = await asyncio.wait_for(late_reaction(native), WITHIN)
                await say(phone, portal, "after")
                await receive(native, got, 4, room_id)
        bodies = [m.content.body for m in got]
        assert bodies == ["first", "its key comes late", "a reply to it", "after"]
        assert (reacted.target, reacted.add) == (got[1].log_index, True)
        assert got[2].content.reply_to == got[1].log_index
        assert notices == [notices[0]], notices  # the target's notice only (since withdrawn)
    await native.close()


async def first_bridged(
    alice: AsyncClient, native: Any, name: str
) -> tuple[bytes, str, list[Message]]:
    """A portal ``alice`` shares with ``native`` (room id, Matrix room id), and her first message
    in it, as ``native`` received it: the bridge has her room key."""
    room_hex, portal = await portal_with_native(alice, native, name)
    room_id = bytes.fromhex(room_hex)
    await say(alice, portal, "first")
    got: list[Message] = []
    await receive(native, got, 1, room_id)
    return room_id, portal, got


async def late_reaction(native: Any) -> ev.Reacted:
    while True:
        event = await native.events.get()
        if isinstance(event, ev.Reacted) and event.key == "late":
            return event


@pytest.mark.asyncio(loop_scope="module")
async def test_a_held_reaction_sent_again_before_the_key_waits_resume_is_held_again(
    stack: BridgeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transaction left unanswered at a stop comes again as soon as the bridge listens, which
    # can be before the bridge has resumed waiting for the room keys it lacked. A reaction held
    # for such a key must then be held again, not failed for a lost target. The lag holds the
    # resumption back; the reaction's transaction is sent again in that window, as Synapse does.
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_id, portal, got = await first_bridged(alice, native, "reaction sent again")
    await stack.stop_bridge()
    async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
        answering = [False]
        requests = answer_key_requests(phone, answering=lambda: answering[0])
        await sync_until(phone, lambda: portal in phone.rooms, "the portal")
        target = await say(phone, portal, "its key comes late")
        await phone.sync(timeout=0)
        relates = {"rel_type": "m.annotation", "event_id": target, "key": "late"}
        sent = await phone.room_send(portal, "m.reaction", {"m.relates_to": relates})
        assert isinstance(sent, RoomSendResponse), sent
        fetched = await phone.room_get_event(portal, sent.event_id)
        assert isinstance(fetched, RoomGetEventResponse), fetched
        async with syncing(phone):
            await stack.restart()
            async with asyncio.timeout(WITHIN):
                while True:  # the reaction recorded as held (in the database), the key asked for
                    if requests and await failure_of(stack, sent.event_id) == e2ee.HELD:
                        break
                    await asyncio.sleep(0.5)
            await stack.stop_bridge()
            asked = len(requests)
            monkeypatch.setenv("KALANDRA_TEST_RESUME_LAG", "5")  # read by the bridge started
            stack.start_bridge()
            monkeypatch.delenv("KALANDRA_TEST_RESUME_LAG")
            await send_transaction(stack, [fetched.event.source])
            await stack.wait_ready()
            async with asyncio.timeout(WITHIN):
                while len(requests) == asked:  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
            answering[0] = True
            await forward_key(phone, requests[-1])
            await receive(native, got, 2, room_id)
            reacted = await asyncio.wait_for(late_reaction(native), WITHIN)
    assert [m.content.body for m in got] == ["first", "its key comes late"]
    assert (reacted.target, reacted.add) == (got[1].log_index, True)
    await native.close()


async def failure_of(stack: BridgeStack, event_id: str) -> str | None:
    """What the bridge recorded of a Matrix event it handled (None: nothing, or done)."""
    rows = await query(
        stack.store_url,
        "SELECT failure FROM bridge_matrix_events WHERE event_id = :event_id",
        event_id=event_id,
    )
    return rows[0][0] if rows else None


async def send_transaction(stack: BridgeStack, events: list[dict[str, Any]]) -> None:
    """``events`` in an appservice transaction to the bridge, as the homeserver sends one, as
    soon as the bridge (just started) listens; answered once handled."""
    config = await asyncio.to_thread(stack.config.read_text, encoding="utf-8")
    hs_token = YAML(typ="safe").load(config)["appservice"]["hs_token"]
    url = (
        f"http://127.0.0.1:{stack.as_port}/_matrix/app/v1/transactions/"
        f"again-{secrets.token_hex(4)}"
    )
    headers = {"Authorization": f"Bearer {hs_token}"}
    async with aiohttp.ClientSession() as http, asyncio.timeout(WITHIN):
        while True:
            try:
                async with http.put(url, json={"events": events}, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)  # not listening yet


@pytest.mark.asyncio(loop_scope="module")
async def test_an_oversized_text_arrives_split_in_an_encrypted_portal(stack: BridgeStack) -> None:
    # Megolm makes an event a third larger: the parts must fit once encrypted too.
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "secret and long")
        room_id = bytes.fromhex(room_hex)
        big = "".join(f"ligne {i:05d} : « déjà vu » — naïve café\n" for i in range(2500))
        assert len(big.encode()) > 100 * 1024
        await native.send_text(room_id, big)
        await native.send_text(room_id, "after the long one")
        async with asyncio.timeout(WITHIN):
            while True:
                seen = await wait_decrypted(alice, portal, ghost_of(native), 1)
                if seen[-1].body == "after the long one":
                    break
                await asyncio.sleep(0.5)
        assert len(seen) > 2
        assert "".join(e.body for e in seen[:-1]) == big
        assert all(e.decrypted for e in seen)
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_reaction_to_a_message_whose_key_never_comes_fails_visibly(
    stack: BridgeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Last in the module: the bridge restarted here gives up its key waits within seconds.
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "lost reaction")
        room_id = bytes.fromhex(room_hex)
        await stack.stop_bridge()
        monkeypatch.setenv("KALANDRA_TEST_LATE_KEY_WAIT", "2")  # read by the bridge restarted
        async with nio_client(stack.synapse, stack.user, encrypted=True) as phone:
            answer_key_requests(phone, answering=lambda: False)
            await sync_until(phone, lambda: portal in phone.rooms, "the portal")
            target = await say(phone, portal, "its key never comes")
            relates = {"rel_type": "m.annotation", "event_id": target, "key": "never"}
            sent = await phone.room_send(portal, "m.reaction", {"m.relates_to": relates})
            assert isinstance(sent, RoomSendResponse), sent
            async with syncing(phone):
                await stack.restart()
                async with asyncio.timeout(WITHIN):
                    while True:
                        history = await room_history(phone, portal)
                        statuses, shown, _ = reports_about(history, sent.event_id)
                        if statuses and shown:
                            break
                        await asyncio.sleep(0.5)
                assert statuses == ["FAIL_PERMANENT"], statuses
                assert shown == [f"Not bridged to Kalandra: {relations.LOST_TARGET}"], shown
                # The portal flows on (the phone's later messages share the lost key: alice
                # speaks), and nothing of the reaction reached the native side. Alice answers
                # the bridge's key requests, as clients do: Synapse drops to-device events to
                # an appservice it still counts as down just after the restart. The bridge
                # is started again with its usual key waits first: two seconds, the wait that
                # made the reaction fail quickly, is too short for an answer on a busy machine.
                await stack.stop_bridge()
                monkeypatch.delenv("KALANDRA_TEST_LATE_KEY_WAIT")
                await stack.restart()
                answer_key_requests(alice)
                got: list[Message] = []
                async with syncing(alice):
                    await say(alice, portal, "after")
                    await receive(native, got, 1, room_id)
        assert [m.content.body for m in got] == ["after"]
        reactions = []
        while not native.events.empty():
            event = native.events.get_nowait()
            if isinstance(event, ev.Reacted):
                reactions.append(event)
        assert reactions == []
    await native.close()
