"""An encrypted portal as Element sees it: the Matrix user is matrix-js-sdk with the Rust crypto
(tests/matrix/jsclient.py), which reports for each event its type on the wire, what it
decrypts to and the shield the SDK gives it.

One stack, one portal for the module: alice (bridge admin, nio) makes it with a native member
and invites the js user (`user` permission) in Matrix; the js user joins as Element would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from nio import AsyncClient, RoomInviteResponse

from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    command,
    ghost_of,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
)
from matrix.jsclient import JsClient, JsEvent, js_client
from matrix.test_bridge_encryption import wait_decrypted

WITHIN = 60.0
STATUS = "com.beeper.message_send_status"


@dataclass
class Portal:
    stack: BridgeStack
    alice: AsyncClient  # bridge admin (nio)
    native: Client
    js: JsClient
    room_id: bytes  # the Kalandra room
    portal: str  # its Matrix room


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def portal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Portal]:
    async with bridge_stack(
        tmp_path_factory.mktemp("jsclient"),
        others=("user",),
        bridge_options={
            "encryption.allow": True,
            "encryption.default": True,
            "message_status_success": True,  # a status event for each bridged message too
        },
    ) as stack:
        native = await native_client(stack)
        js_user = stack.others["user"]
        async with (
            nio_client(stack.synapse, stack.user, encrypted=True) as alice,
            js_client(stack.synapse, js_user) as js,
        ):
            room_hex, portal = await portal_with_native(alice, native, "as Element sees it")
            # Invited in Matrix by alice, who has invite power in the portal (she is an admin).
            invited = await alice.room_invite(portal, js.user_id)
            assert isinstance(invited, RoomInviteResponse), invited
            assert await js.join(portal), "the portal is not encrypted for the js client"
            yield Portal(stack, alice, native, js, bytes.fromhex(room_hex), portal)
        await native.close()


def relates_to(event: JsEvent) -> str | None:
    target = (event.relation or {}).get("event_id")
    return target if isinstance(target, str) else None


def texts_from(events: list[JsEvent], sender: str) -> list[JsEvent]:
    return [e for e in events if e.sender == sender and e.type == "m.room.message"]


async def from_others(native: Client, count: int, room: bytes) -> list[Message]:
    got: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, got, count, room), WITHIN)
    return got


@pytest.mark.asyncio(loop_scope="module")
async def test_messages_both_ways_between_element_and_a_native_member(portal: Portal) -> None:
    js, ghost = portal.js, ghost_of(portal.native)
    await portal.native.send_text(portal.room_id, "hello from Kalandra")
    events = await js.wait_timeline(
        portal.portal,
        lambda events: any(e.body == "hello from Kalandra" for e in texts_from(events, ghost)),
        "the ghost's message",
    )
    [hello] = [e for e in texts_from(events, ghost) if e.body == "hello from Kalandra"]
    assert (hello.wire_type, hello.msgtype, hello.decryption_failure) == (
        "m.room.encrypted",
        "m.text",
        False,
    )

    sent = await js.send_text(portal.portal, "hello from Element")
    got = await from_others(portal.native, 1, portal.room_id)
    assert [m.content.body for m in got] == ["hello from Element"]
    # What the js client sent went encrypted, and the bridge says it was delivered (encrypted).
    events = await js.wait_timeline(
        portal.portal,
        lambda events: any(
            e.type == STATUS and relates_to(e) == sent and e.content.get("status") != "PENDING"
            for e in events
        ),
        "the status event of its message",
    )
    [mine] = [e for e in events if e.event_id == sent]
    assert (mine.wire_type, mine.body) == ("m.room.encrypted", "hello from Element")
    [status] = [
        e
        for e in events
        if e.type == STATUS and relates_to(e) == sent and e.content.get("status") != "PENDING"
    ]
    assert (status.sender, status.wire_type, status.content["status"]) == (
        BOT,
        "m.room.encrypted",
        "SUCCESS",
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_command_replies_in_an_encrypted_portal_arrive_encrypted(portal: Portal) -> None:
    js = portal.js
    asked = await js.send_text(portal.portal, "!kalandra ping")

    def answered(events: list[JsEvent]) -> bool:
        return any(e.sender == BOT and e.msgtype == "m.notice" for e in after(events, asked))

    events = await js.wait_timeline(portal.portal, answered, "the bot's answer")
    [reply] = [e for e in after(events, asked) if e.sender == BOT and e.msgtype == "m.notice"]
    assert reply.wire_type == "m.room.encrypted"
    assert not reply.decryption_failure
    assert str(reply.body).startswith("Pong:"), reply.body


def after(events: list[JsEvent], event_id: str) -> list[JsEvent]:
    ids = [e.event_id for e in events]
    return events[ids.index(event_id) + 1 :] if event_id in ids else []


@pytest.mark.asyncio(loop_scope="module")
async def test_ghost_messages_show_no_shield(portal: Portal) -> None:
    # Each ghost encrypts with a device of its own, cross-signed by the ghost's own keys
    # (bridge.encryption.ghost_devices, on by default): the Megolm session's owner is the
    # event's sender and vouches for its device, so Element shows nothing. With the switch off
    # the bot's device encrypts and the shield is red (test_bridge_ghost_devices.py).
    js, ghost = portal.js, ghost_of(portal.native)
    await portal.native.send_text(portal.room_id, "which shield?")
    events = await js.wait_timeline(
        portal.portal,
        lambda events: any(e.body == "which shield?" for e in texts_from(events, ghost)),
        "the ghost's message",
    )
    [message] = [e for e in texts_from(events, ghost) if e.body == "which shield?"]
    assert (message.wire_type, message.decryption_failure) == ("m.room.encrypted", False)
    assert (message.shield_colour, message.shield_reason) == ("NONE", None)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_user_the_bot_lets_in_after_a_ghost_spoke_decrypts_the_ghosts_next_messages(
    portal: Portal,
) -> None:
    # `!kalandra invite ROOM @user` (`open` and a native member's invitation go the same way):
    # the bot itself invites, into a portal whose Megolm session the members already have.
    js, alice, native = portal.js, portal.alice, portal.native
    room_hex, later = await portal_with_native(alice, native, "joined later")
    room_id = bytes.fromhex(room_hex)
    await native.send_text(room_id, "before you came")  # the bot's Megolm session starts
    await wait_decrypted(alice, later, ghost_of(native), 1)
    answer = await command(alice, later, f"!kalandra invite {room_hex} {js.user_id}")
    assert answer.startswith(f"Invited {js.user_id}"), answer
    assert await js.join(later)
    await native.send_text(room_id, "after you came")
    ghost = ghost_of(native)
    events = await js.wait_timeline(
        later,
        lambda events: any(e.body == "after you came" for e in texts_from(events, ghost)),
        "the ghost's message decrypted",
        within=10,  # the key comes within a second when it comes at all
    )
    assert [e.body for e in texts_from(events, ghost)] == ["after you came"]
