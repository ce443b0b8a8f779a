"""Replies, edits, reactions, read receipts, typing, mentions and locations across the bridge,
against a real Synapse: each feature in both directions (locations: Matrix to Kalandra, as
text), asserting what the receiving side sees: the native member's decoded events (its client
reports reactions, receipts and typing), the Matrix user's room history, receipts and typing
notices. The stack has delivery receipts on (``bridge.delivery_receipts``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from helpers.native import next_event, next_from_others
from nacl.signing import SigningKey
from nio import (
    AsyncClient,
    MatrixRoom,
    ReceiptEvent,
    RoomReadMarkersResponse,
    RoomSendResponse,
    TypingNoticeEvent,
)

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.extras import ExtendedCore, mark_read, react, set_typing
from kalandra_core.storage.sql import SqlStore
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    ghost_of,
    nio_client,
    portal_with_native,
    room_history,
    say,
    sync_until,
    wait_history,
)

WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("relations"),
        request.param,
        others=("relay",),
        bridge_options={"delivery_receipts": True},
    ) as stack:
        yield stack


async def native_member(stack: BridgeStack) -> tuple[Client, str]:
    """A new native member whose client reports reactions, receipts and typing; with its
    account name."""
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        name = f"native_{secrets.token_hex(3)}"
        account = await store.create_member(name)
        token = await store.issue_token(account.member_id)
    finally:
        await store.close()
    core = ExtendedCore(account.member_id, bytes(SigningKey.generate()))
    client = Client(core, ServerAddress("tcp", "127.0.0.1", stack.tcp_port), token)
    await client.connect()
    await client.publish_key_packages(2)
    return client, name


async def send(alice: AsyncClient, room: str, content: dict[str, Any], kind: str) -> str:
    sent = await alice.room_send(room, kind, content)
    assert isinstance(sent, RoomSendResponse), sent
    return str(sent.event_id)


async def matrix_events(
    alice: AsyncClient, room: str, sender: str, kind: str
) -> list[dict[str, Any]]:
    """The raw events of ``kind`` by ``sender`` in the room, oldest first."""
    return [
        e.source
        for e in await room_history(alice, room)
        if e.source.get("sender") == sender and e.source.get("type") == kind
    ]


async def wait_events(
    alice: AsyncClient,
    room: str,
    sender: str,
    kind: str,
    done: Callable[[list[dict[str, Any]]], bool],
) -> list[dict[str, Any]]:
    async with asyncio.timeout(WITHIN):
        while not done(found := await matrix_events(alice, room, sender, kind)):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return found


async def alice_speaks(alice: AsyncClient, native: Client, portal: str) -> tuple[str, ev.Message]:
    """Alice speaks once (which makes her a Kalandra member): her event id, and the message
    as the native member received it."""
    event_id = await say(alice, portal, "hello")
    message = await next_from_others(native)
    assert message.content.body == "hello"
    assert message.sender_id != native.core.member_id
    return event_id, message


@pytest.mark.asyncio(loop_scope="module")
async def test_replies(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "replies")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        question = await native.send(room, Content(body="question?"))
        ((question_event, _),) = await wait_history(alice, portal, ghost, 1)

        # Matrix -> Kalandra: the reply points at the question's log index (fallback dropped).
        content = {
            "msgtype": "m.text",
            "body": f"> <{ghost}> question?\n\nanswer",
            "m.relates_to": {"m.in_reply_to": {"event_id": question_event}},
        }
        answer_event = await send(alice, portal, content, "m.room.message")
        answer = await next_from_others(native)
        assert answer.content.body == "answer"
        assert answer.content.reply_to == question

        # Kalandra -> Matrix: the ghost's reply points at Alice's event.
        await native.send(room, Content(body="thanks", reply_to=answer.log_index))
        found = await wait_events(alice, portal, ghost, "m.room.message", lambda f: len(f) == 2)
        reply = found[1]["content"]
        assert reply["body"] == "thanks"
        assert reply["m.relates_to"] == {"m.in_reply_to": {"event_id": answer_event}}
        assert "m.relates_to" not in found[0]["content"]
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_edits(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "edits")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)

        # Matrix -> Kalandra: an edit is a message with edit_of, from the same member.
        original = await say(alice, portal, "helo")
        first = await next_from_others(native)
        edit = {
            "msgtype": "m.text",
            "body": "* hello",
            "m.new_content": {"msgtype": "m.text", "body": "hello"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        }
        await send(alice, portal, edit, "m.room.message")
        edited = await next_from_others(native)
        assert edited.content.body == "hello"
        assert edited.content.edit_of == first.log_index
        assert edited.content.reply_to is None
        assert edited.sender_id == first.sender_id

        # Kalandra -> Matrix: an m.replace of the ghost's own event, new content inside.
        draft = await native.send(room, Content(body="draft"))
        await native.send(room, Content(body="final", edit_of=draft))
        found = await wait_events(alice, portal, ghost, "m.room.message", lambda f: len(f) == 2)
        assert found[0]["content"]["body"] == "draft"
        content = found[1]["content"]
        assert content["m.relates_to"] == {
            "rel_type": "m.replace",
            "event_id": found[0]["event_id"],
        }
        assert content["m.new_content"]["body"] == "final"
        assert content["body"] == "* final"
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_reactions(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "reactions")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        target = await native.send(room, Content(body="react to me"))
        ((target_event, _),) = await wait_history(alice, portal, ghost, 1)

        # Matrix -> Kalandra: Alice's reaction is her member's, on the message's log index;
        # its redaction takes it off.
        annotation = {"rel_type": "m.annotation", "event_id": target_event, "key": "👍"}
        reaction = await send(alice, portal, {"m.relates_to": annotation}, "m.reaction")
        mine = native.core.member_id
        added = await next_event(native, ev.Reacted, lambda e: e.sender_id != mine)
        assert (added.target, added.key, added.add) == (target, "👍", True)
        await alice.room_redact(portal, reaction)
        removed = await next_event(native, ev.Reacted, lambda e: e.sender_id != mine)
        assert (removed.sender_id, removed.target, removed.key) == (added.sender_id, target, "👍")
        assert removed.add is False

        # Kalandra -> Matrix: the ghost reacts to Alice's event, then its reaction is redacted.
        alice_event = await say(alice, portal, "my message")
        message = await next_from_others(native)
        await react(native, room, message.log_index, "🎉")

        def ghost_reaction(found: list[dict[str, Any]]) -> bool:
            return any(
                e["content"].get("m.relates_to")
                == {"rel_type": "m.annotation", "event_id": alice_event, "key": "🎉"}
                for e in found
            )

        (ghost_event,) = await wait_events(alice, portal, ghost, "m.reaction", ghost_reaction)
        await react(native, room, message.log_index, "🎉", add=False)

        def redacted(found: list[dict[str, Any]]) -> bool:
            (event,) = [e for e in found if e["event_id"] == ghost_event["event_id"]]
            return "redacted_because" in event.get("unsigned", {})

        await wait_events(alice, portal, ghost, "m.reaction", redacted)
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_read_receipts(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "receipts")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        alice_event, hello = await alice_speaks(alice, native, portal)
        alice_member = hello.sender_id
        read_me = await native.send(room, Content(body="read me"))
        ((read_me_event, _),) = await wait_history(alice, portal, ghost, 1)

        # Matrix -> Kalandra: Alice's read receipt is her member's Read receipt for that index.
        marked = await alice.room_read_markers(portal, read_me_event, read_me_event)
        assert isinstance(marked, RoomReadMarkersResponse), marked
        receipt = await next_event(native, ev.Receipted, lambda e: e.sender_id == alice_member)
        assert (receipt.target, receipt.kind) == (read_me, "Read")

        # Kalandra -> Matrix: the native member's receipt is the ghost's, on Alice's event.
        seen: list[tuple[str, str]] = []

        async def on_receipt(matrix_room: MatrixRoom, event: ReceiptEvent) -> None:
            if matrix_room.room_id == portal:
                seen.extend((r.user_id, r.event_id) for r in event.receipts)

        alice.add_ephemeral_callback(on_receipt, ReceiptEvent)
        await mark_read(native, room, hello.log_index)
        await sync_until(alice, lambda: (ghost, alice_event) in seen, "the ghost's receipt", 60)
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_typing(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "typing")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        _, hello = await alice_speaks(alice, native, portal)
        alice_member = hello.sender_id

        # Matrix -> Kalandra: Alice typing, then not.
        await alice.room_typing(portal, True, 30000)
        typing = await next_event(native, ev.Typing, lambda e: e.sender_id == alice_member)
        assert typing.typing
        assert typing.timeout_ms > 0
        await alice.room_typing(portal, False)
        stopped = await next_event(native, ev.Typing, lambda e: e.sender_id == alice_member)
        assert not stopped.typing

        # Kalandra -> Matrix: the ghost typing, then not.
        typers: list[list[str]] = []

        async def on_typing(matrix_room: MatrixRoom, event: TypingNoticeEvent) -> None:
            if matrix_room.room_id == portal:
                typers.append(list(event.users))

        alice.add_ephemeral_callback(on_typing, TypingNoticeEvent)
        set_typing(native, room, True)
        await sync_until(alice, lambda: bool(typers) and ghost in typers[-1], "ghost typing", 60)
        set_typing(native, room, False)
        await sync_until(alice, lambda: ghost not in typers[-1], "ghost stopped typing", 60)
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_mentions(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    other, other_name = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "mentions")
        room, ghost, other_ghost = bytes.fromhex(room_hex), ghost_of(native), ghost_of(other)
        answer = await command(
            alice, portal, f"!kalandra invite {room_hex} {other.core.member_id}"
        )
        assert answer.startswith("Added member"), answer
        assert await asyncio.wait_for(other.joined.get(), WITHIN) == room

        # Matrix -> Kalandra: a pill of a ghost (and m.mentions) names its member.
        content = {
            "msgtype": "m.text",
            "body": f"hey {other_name}",
            "format": "org.matrix.custom.html",
            "formatted_body": f'hey <a href="https://matrix.to/#/{other_ghost}">{other_name}</a>',
            "m.mentions": {"user_ids": [other_ghost]},
        }
        await send(alice, portal, content, "m.room.message")
        mention = await next_from_others(native)
        assert mention.content.body == f"hey {other_name}"
        assert mention.content.extra["mentions"] == [other.core.member_id]
        alice_member = mention.sender_id

        # Kalandra -> Matrix: member ids become m.mentions and a pill with the ghost's name.
        body = f"ping @{other_name} and you"
        mentions = [other.core.member_id, alice_member]
        await native.send(room, Content(body=body, extra={"mentions": mentions}))
        (found,) = await wait_events(alice, portal, ghost, "m.room.message", lambda f: len(f) == 1)
        content = found["content"]
        assert content["body"] == body
        assert content["m.mentions"] == {"user_ids": [other_ghost, alice.user_id]}
        pill = f'<a href="https://matrix.to/#/{other_ghost}">{other_name} (Kalandra)</a>'
        assert content["formatted_body"] == f"ping {pill} and you"
    await native.close()
    await other.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_location_as_text(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        _, portal = await portal_with_native(alice, native, "location")
        content = {"msgtype": "m.location", "body": "Zurich", "geo_uri": "geo:47.3769,8.5417"}
        await send(alice, portal, content, "m.room.message")
        message = await next_from_others(native)
        assert message.content.body == "Location: geo:47.3769,8.5417"
        assert message.content.kind == "text"
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_delivery_receipts(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "delivery")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        receipts: list[tuple[str, str]] = []

        async def on_receipt(matrix_room: MatrixRoom, event: ReceiptEvent) -> None:
            if matrix_room.room_id == portal:
                receipts.extend((r.user_id, r.event_id) for r in event.receipts)

        alice.add_ephemeral_callback(on_receipt, ReceiptEvent)

        # Matrix -> Kalandra: once the log has Alice's message, the bot's receipt marks it.
        alice_event, hello = await alice_speaks(alice, native, portal)
        await sync_until(alice, lambda: (BOT, alice_event) in receipts, "the bot's receipt", 60)

        # Kalandra -> Matrix: once Matrix has the native message, the bot's member says so.
        sent = await native.send(room, Content(body="delivered?"))
        await wait_history(alice, portal, ghost, 1)

        def delivered(event: ev.Receipted) -> bool:
            return event.kind == "Delivered" and event.sender_id not in (
                native.core.member_id,
                hello.sender_id,
            )

        receipt = await next_event(native, ev.Receipted, delivered)
        assert receipt.target == sent
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_relayed_users_reactions_are_refused_visibly(stack: BridgeStack) -> None:
    native, _ = await native_member(stack)
    relay = stack.others["relay"]
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, relay) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "relayed")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        await alice.room_invite(portal, bob.user_id)
        joined = await bob.join(portal)
        assert type(joined).__name__ == "JoinResponse", joined
        await native.send(room, Content(body="react if you can"))
        ((target, _),) = await wait_history(alice, portal, ghost, 1)

        await bob.sync(timeout=0)
        notices = bot_notices(bob, portal)
        annotation = {"rel_type": "m.annotation", "event_id": target, "key": "👍"}
        await send(bob, portal, {"m.relates_to": annotation}, "m.reaction")
        await sync_until(bob, lambda: bool(notices), "the refusal", 60)
        assert "reactions need the `user` permission" in notices[0]
    await native.close()
