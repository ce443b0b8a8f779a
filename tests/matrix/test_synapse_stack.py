"""The Matrix test stack itself, with real parts: Synapse, matrix-nio (E2EE), an appservice.

These prove what the bridge tests will stand on: users and rooms on a throwaway Synapse, appservice
transactions reaching an aiohttp server, and end-to-end encryption between two nio clients.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from aiohttp import web
from helpers.matrix import PASSWORD, nio_client, sync_until
from nio import (
    AsyncClient,
    JoinResponse,
    MatrixRoom,
    MegolmEvent,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
)

from matrix.synapse import Synapse, SynapseError

if TYPE_CHECKING:
    from matrix.conftest import StackAppservice

ENCRYPTION_STATE = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}
_counter = itertools.count()


def unique(prefix: str) -> str:
    """A localpart no other test of this session uses (the Synapse is shared)."""
    return f"{prefix}{next(_counter)}_{secrets.token_hex(3)}"


def collect_texts(client: AsyncClient, room_id: str) -> list[RoomMessageText]:
    """Every text message `client` receives in `room_id` from now on, in timeline order."""
    seen: list[RoomMessageText] = []

    async def on_text(room: MatrixRoom, event: RoomMessageText) -> None:
        if room.room_id == room_id:
            seen.append(event)

    client.add_event_callback(on_text, RoomMessageText)
    return seen


async def accept_invite(client: AsyncClient, room_id: str) -> None:
    await sync_until(client, lambda: room_id in client.invited_rooms, f"the invite to {room_id}")
    joined = await client.join(room_id)
    assert isinstance(joined, JoinResponse), joined


async def send_text(client: AsyncClient, room_id: str, body: str) -> str:
    sent = await client.room_send(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        ignore_unverified_devices=True,
    )
    assert isinstance(sent, RoomSendResponse), sent
    event_id: str = sent.event_id
    return event_id


# -- (a) two users, one room, messages in order ---------------------------------------------------


async def test_two_users_exchange_messages_in_order(synapse: Synapse) -> None:
    alice, bob = unique("alice"), unique("bob")
    assert await synapse.register_user(alice, PASSWORD) == f"@{alice}:localhost"
    assert await synapse.register_user(bob, PASSWORD) == f"@{bob}:localhost"
    with pytest.raises(SynapseError, match="M_USER_IN_USE"):
        await synapse.register_user(alice, PASSWORD)

    async with nio_client(synapse, alice) as a, nio_client(synapse, bob) as b:
        created = await a.room_create(name="stack test", invite=[b.user_id])
        assert isinstance(created, RoomCreateResponse), created
        room_id = created.room_id
        seen_by_a, seen_by_b = collect_texts(a, room_id), collect_texts(b, room_id)
        await accept_invite(b, room_id)

        script = [(a, "a1: hello bob"), (b, "b1: hi alice"), (a, "a2: how are you"), (b, "b2: ok")]
        sent_ids = [await send_text(client, room_id, body) for client, body in script]
        expected = [(client.user_id, body) for client, body in script]

        await sync_until(a, lambda: len(seen_by_a) >= 4, "the four messages")
        await sync_until(b, lambda: len(seen_by_b) >= 4, "the four messages")
        for seen in (seen_by_a, seen_by_b):
            assert [(e.sender, e.body) for e in seen] == expected
            assert [e.event_id for e in seen] == sent_ids

    # The helper's own login/logout, for the bridge tests that use raw HTTP.
    token, device_id = await synapse.login(alice, PASSWORD)
    whoami = await synapse.request("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert whoami == {"user_id": f"@{alice}:localhost", "device_id": device_id, "is_guest": False}
    await synapse.logout(token)
    gone = await synapse.request(
        "GET", "/_matrix/client/v3/account/whoami", token=token, expect=401
    )
    assert gone["errcode"] == "M_UNKNOWN_TOKEN"


# -- (b) a minimal appservice receives the events of a room its bot is in -------------------------


class MiniAppservice:
    """Just enough of the appservice API: transactions (de-duplicated by id) and ping."""

    def __init__(self, hs_token: str) -> None:
        self.hs_token = hs_token
        self.events: list[dict[str, Any]] = []
        self.transactions: set[str] = set()
        self.rejected = 0
        self.pings = 0
        self.arrived = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_put("/_matrix/app/v1/transactions/{txn}", self.on_transaction)
        self.app.router.add_post("/_matrix/app/v1/ping", self.on_ping)

    def authorized(self, request: web.Request) -> bool:
        if request.headers.get("Authorization") == f"Bearer {self.hs_token}":
            return True
        self.rejected += 1
        return False

    async def on_transaction(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        body = await request.json()
        txn = request.match_info["txn"]
        if txn not in self.transactions:
            self.transactions.add(txn)
            self.events.extend(body.get("events", []))
            self.arrived.set()
        return web.json_response({})

    async def on_ping(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        self.pings += 1
        return web.json_response({})

    async def wait_for(self, what: str, within: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first event pushed so far, or from now on, whose `fields` have these values."""
        try:
            async with asyncio.timeout(within):
                while (event := self.find(**fields)) is None:
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} pushed to the appservice in {within} s") from None
        return event

    def find(self, **fields: Any) -> dict[str, Any] | None:
        for event in self.events:
            if all(_field(event, key) == value for key, value in fields.items()):
                return event
        return None


def _field(event: dict[str, Any], dotted: str) -> Any:
    value: Any = event
    for part in dotted.split("__"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


async def test_appservice_receives_room_events(
    synapse: Synapse, stack_appservice: StackAppservice
) -> None:
    appservice = MiniAppservice(stack_appservice.hs_token)
    runner = web.AppRunner(appservice.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", stack_appservice.port).start()
    as_token = stack_appservice.as_token
    bot = synapse.mxid(stack_appservice.sender_localpart)
    alice = unique("alice")
    await synapse.register_user(alice, PASSWORD)
    token, _ = await synapse.login(alice, PASSWORD)
    room_id: str | None = None
    try:
        # Synapse reaches the appservice, with the hs_token (and a down AS is retried at once).
        await synapse.request(
            "POST",
            f"/_matrix/client/v1/appservice/{stack_appservice.appservice_id}/ping",
            json_body={},
            token=as_token,
        )
        assert appservice.pings == 1

        # The bot user, created by the appservice itself (it may exist already: fine).
        registered = await synapse.request(
            "POST",
            "/_matrix/client/v3/register",
            json_body={
                "type": "m.login.application_service",
                "username": stack_appservice.sender_localpart,
                "inhibit_login": True,
            },
            token=as_token,
            expect=None,
        )
        assert registered.get("user_id") == bot or registered.get("errcode") == "M_USER_IN_USE"
        # A user outside its namespace is refused.
        refused = await synapse.request(
            "POST",
            "/_matrix/client/v3/register",
            json_body={"type": "m.login.application_service", "username": unique("nobody")},
            token=as_token,
            expect=400,
        )
        assert refused["errcode"] == "M_EXCLUSIVE"

        created = await synapse.request(
            "POST", "/_matrix/client/v3/createRoom", json_body={"invite": [bot]}, token=token
        )
        room_id = created["room_id"]
        room = quote(room_id)
        invite = await appservice.wait_for(
            "the bot's invite",
            room_id=room_id,
            type="m.room.member",
            state_key=bot,
            content__membership="invite",
        )
        await synapse.request(
            "POST", f"/_matrix/client/v3/rooms/{room}/join", json_body={}, token=as_token
        )
        sent = await synapse.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/txn1",
            json_body={"msgtype": "m.text", "body": "hello, bridge"},
            token=token,
        )
        message = await appservice.wait_for("alice's message", event_id=sent["event_id"])
        assert message["sender"] == f"@{alice}:localhost"
        assert message["room_id"] == room_id
        assert message["content"] == {"msgtype": "m.text", "body": "hello, bridge"}

        ids = [e["event_id"] for e in appservice.events if e["room_id"] == room_id]
        join = appservice.find(room_id=room_id, state_key=bot, content__membership="join")
        assert join is not None
        assert (
            ids.index(invite["event_id"])
            < ids.index(join["event_id"])
            < ids.index(sent["event_id"])
        )
        assert len(ids) == len(set(ids)), "an event was delivered twice"
        assert appservice.rejected == 0
    finally:
        if room_id is not None:  # the bot leaves, so nothing more is pushed to a stopped AS
            await synapse.request(
                "POST",
                f"/_matrix/client/v3/rooms/{quote(room_id)}/leave",
                json_body={},
                token=as_token,
                expect=None,
            )
        await synapse.logout(token)
        await runner.cleanup()


# -- (c) end-to-end encryption between two nio clients --------------------------------------------


async def test_encrypted_room_between_two_nio_clients(synapse: Synapse) -> None:
    alice, bob = unique("alice"), unique("bob")
    await synapse.register_user(alice, PASSWORD)
    await synapse.register_user(bob, PASSWORD)

    async with (
        nio_client(synapse, alice, encrypted=True) as a,
        nio_client(synapse, bob, encrypted=True) as b,
    ):
        created = await a.room_create(
            name="secret", invite=[b.user_id], initial_state=[ENCRYPTION_STATE]
        )
        assert isinstance(created, RoomCreateResponse), created
        room_id = created.room_id
        seen_by_a, seen_by_b = collect_texts(a, room_id), collect_texts(b, room_id)
        undecrypted: list[MegolmEvent] = []

        async def on_undecrypted(room: MatrixRoom, event: MegolmEvent) -> None:
            undecrypted.append(event)

        for client in (a, b):
            client.add_event_callback(on_undecrypted, MegolmEvent)

        await accept_invite(b, room_id)
        # Alice learns that Bob joined before she shares her room key with him.
        await sync_until(
            a,
            lambda: room_id in a.rooms and b.user_id in a.rooms[room_id].users,
            "bob's join",
        )
        assert a.rooms[room_id].encrypted

        sent = await send_text(a, room_id, "the eagle lands at dawn")
        raw = await synapse.request(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(sent)}",
            token=b.access_token,
        )
        assert raw["type"] == "m.room.encrypted", "the message went out in plaintext"
        assert "the eagle" not in str(raw["content"])

        await sync_until(b, lambda: len(seen_by_b) >= 1, "alice's message, decrypted")
        assert [(e.sender, e.body, e.decrypted) for e in seen_by_b] == [
            (a.user_id, "the eagle lands at dawn", True)
        ]

        # And back: Bob's client shares its own session with Alice's device.
        await send_text(b, room_id, "copy that")
        await sync_until(
            a, lambda: any(e.body == "copy that" for e in seen_by_a), "bob's reply, decrypted"
        )
        reply = next(e for e in seen_by_a if e.body == "copy that")
        assert reply.decrypted
        assert reply.sender == b.user_id
        assert undecrypted == [], "some events could not be decrypted"


# -- (d) restart keeps the data (runs last: it briefly takes the shared Synapse away) -------------


async def test_restart_keeps_users_and_rooms(synapse: Synapse) -> None:
    carol = unique("carol")
    await synapse.register_user(carol, PASSWORD)
    token, _ = await synapse.login(carol, PASSWORD)
    room_id = (
        await synapse.request("POST", "/_matrix/client/v3/createRoom", token=token, json_body={})
    )["room_id"]
    await synapse.restart()
    assert synapse.running
    joined = await synapse.request("GET", "/_matrix/client/v3/joined_rooms", token=token)
    assert joined == {"joined_rooms": [room_id]}
    await synapse.logout(token)
