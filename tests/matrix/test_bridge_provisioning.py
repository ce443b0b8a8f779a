"""The provisioning API against a real Synapse and the bridge's real Kalandra server: the
shared secret and the permissions of the user a call acts for, creating and opening portals,
bridging and unbridging an existing Matrix room, and device tokens that really log in."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from helpers.sql import query
from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    RoomCreateResponse,
    RoomGetStateEventResponse,
    RoomResolveAliasResponse,
)
from ruamel.yaml import YAML

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.crypto import sealed
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bot_notices,
    bridge_stack,
    nio_client,
    sync_until,
)

PREFIX = "/_matrix/provision/v1"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("provisioning"), "sqlite", others=("user", "relay", "admin")
    ) as stack:
        yield stack


def config_value(stack: BridgeStack, *path: str) -> Any:
    with open(stack.config, encoding="utf-8") as fh:
        node = YAML().load(fh)
    for key in path:
        node = node[key]
    return node


def secret(stack: BridgeStack) -> str:
    value = config_value(stack, "bridge", "provisioning", "shared_secret")
    assert isinstance(value, str)
    return value


async def api(
    stack: BridgeStack,
    method: str,
    path: str,
    user: str | None,
    body: Any = None,
    *,
    auth: str | None = "secret",
    raw: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """A provisioning call for ``@user:localhost`` (None: no user_id); ``auth`` is the
    Authorization header ("secret": the configured one, None: none)."""
    headers = {}
    if auth == "secret":
        headers["Authorization"] = f"Bearer {secret(stack)}"
    elif auth is not None:
        headers["Authorization"] = auth
    params = {} if user is None else {"user_id": f"@{user}:localhost"}
    url = f"http://127.0.0.1:{stack.as_port}{PREFIX}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.request(method, url, params=params, headers=headers, json=body, data=raw) as response,
    ):
        return response.status, await response.json()


def invites_of(client: AsyncClient) -> list[str]:
    """Rooms ``client`` is invited to from now on."""
    seen: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == client.user_id and event.membership == "invite":
            seen.append(room.room_id)

    client.add_event_callback(on_invite, InviteMemberEvent)
    return seen


async def bridge_state(client: AsyncClient, room: str, room_hex: str) -> dict[str, Any]:
    state = await client.room_get_state_event(
        room, "m.bridge", f"org.kalandra.bridge://kalandra/{room_hex}"
    )
    assert isinstance(state, RoomGetStateEventResponse), state
    return dict(state.content)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_secret_and_permissions_are_checked(stack: BridgeStack) -> None:
    alice, relay = stack.user, stack.others["relay"]
    status, body = await api(stack, "GET", "/rooms", alice, auth=None)
    assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")
    status, body = await api(stack, "GET", "/rooms", alice, auth="Bearer not-the-secret")
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    status, body = await api(stack, "GET", "/whoami", None)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    status, body = await api(stack, "GET", "/nothing-here", alice)
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")

    # A relay user may only ask who it is; a user may not bridge or unbridge.
    status, body = await api(stack, "GET", "/whoami", relay)
    assert status == 200, body
    assert body == {
        "user_id": f"@{relay}:localhost",
        "permission": "relay",
        "kalandra": None,
        "portals": [],
    }
    for method, path in (("GET", "/rooms"), ("POST", "/rooms"), ("POST", "/device-token")):
        status, body = await api(stack, method, path, relay, {"name": "x"})
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), (method, path)
    user = stack.others["user"]
    room = "00" * 16
    for method in ("POST", "DELETE"):
        status, body = await api(stack, method, f"/rooms/{room}/bridge", user, {})
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), method

    # Bad input.
    for body_in in ({}, {"name": ""}, {"name": 5}, [1]):
        status, body = await api(stack, "POST", "/rooms", alice, body_in)
        assert (status, body["errcode"]) in ((400, "M_BAD_JSON"),), body_in
    status, body = await api(stack, "POST", "/rooms", alice, raw="not json")
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")
    status, body = await api(stack, "POST", "/rooms/abc/open", alice)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    status, body = await api(stack, "POST", f"/rooms/{room}/open", alice)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    assert secret(stack) not in stack.log.read_text(errors="replace")


@pytest.mark.asyncio(loop_scope="module")
async def test_create_list_whoami_unbridge_and_open(stack: BridgeStack) -> None:
    async with nio_client(stack.synapse, stack.user) as alice:
        await alice.sync(timeout=0)
        invites = invites_of(alice)
        status, created = await api(stack, "POST", "/rooms", stack.user, {"name": "provisioned"})
        assert status == 201, created
        room_hex, portal = created["room_id"], created["matrix_room_id"]
        assert created["name"] == "provisioned"
        assert created["alias"] == f"#kalandra_{room_hex}:localhost"
        assert created["relay"] is False

        # The portal really exists in Matrix, with its alias and bridge state, and alice is
        # invited.
        await sync_until(alice, lambda: portal in invites, "the invite to the portal")
        await alice.join(portal)
        resolved = await alice.room_resolve_alias(created["alias"])
        assert isinstance(resolved, RoomResolveAliasResponse), resolved
        assert resolved.room_id == portal
        state = await bridge_state(alice, portal, room_hex)
        assert (state["channel"]["id"], state["bridgebot"]) == (room_hex, BOT)

        status, listed = await api(stack, "GET", "/rooms", stack.user)
        assert status == 200, listed
        assert created in listed["rooms"]
        status, me = await api(stack, "GET", "/whoami", stack.user)
        assert status == 200, me
        assert me["permission"] == "admin"
        mine = [p for p in me["portals"] if p["room_id"] == room_hex]
        assert [p["matrix"] in ("invite", "join") for p in mine] == [True], me

        # Unbridged: the bot leaves, the bridge state is cleared; unbridging again is a 404.
        status, gone = await api(stack, "DELETE", f"/rooms/{room_hex}/bridge", stack.user)
        assert (status, gone["matrix_room_id"]) == (200, portal), gone
        assert await bridge_state(alice, portal, room_hex) == {}
        status, body = await api(stack, "DELETE", f"/rooms/{room_hex}/bridge", stack.user)
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
        status, listed = await api(stack, "GET", "/rooms", stack.user)
        assert room_hex not in [r["room_id"] for r in listed["rooms"]]

        # Opened again: the Kalandra room gets a new portal, and alice an invite to it.
        status, opened = await api(stack, "POST", f"/rooms/{room_hex}/open", stack.user)
        assert status == 200, opened
        assert opened["room_id"] == room_hex
        assert opened["matrix_room_id"] not in (None, portal)
        await sync_until(alice, lambda: opened["matrix_room_id"] in invites, "the new invite")
        await alice.join(opened["matrix_room_id"])
        state = await bridge_state(alice, opened["matrix_room_id"], room_hex)
        assert state["channel"]["id"] == room_hex


@pytest.mark.asyncio(loop_scope="module")
async def test_bridge_an_existing_matrix_room(stack: BridgeStack) -> None:
    alice = stack.user
    status, created = await api(stack, "POST", "/rooms", alice, {"name": "to move"})
    assert status == 201, created
    room_hex = created["room_id"]
    async with nio_client(stack.synapse, alice) as client:
        made = await client.room_create(
            name="existing", invite=[BOT], power_level_override={"users": {BOT: 100}}
        )
        assert isinstance(made, RoomCreateResponse), made
        existing = made.room_id
        notices = bot_notices(client, existing)
        await sync_until(client, lambda: len(notices) >= 1, "the bot's welcome")
        lonely = await client.room_create(name="no bot here")
        assert isinstance(lonely, RoomCreateResponse), lonely

        path = f"/rooms/{room_hex}/bridge"
        # Both sides bridged already.
        status, body = await api(stack, "POST", path, alice, {"matrix_room_id": existing})
        assert (status, body["errcode"]) == (409, "KALANDRA_ALREADY_BRIDGED"), body
        status, body = await api(
            stack, "POST", path, alice, {"matrix_room_id": created["matrix_room_id"]}
        )
        assert (status, body["errcode"]) == (409, "KALANDRA_ALREADY_BRIDGED"), body
        status, body = await api(stack, "DELETE", path, alice)
        assert status == 200, body

        status, body = await api(stack, "POST", path, alice, {"matrix_room_id": "nope"})
        assert (status, body["errcode"]) == (400, "M_BAD_JSON")
        status, body = await api(stack, "POST", path, alice, {"matrix_room_id": lonely.room_id})
        assert (status, body["errcode"]) == (403, "KALANDRA_BOT_NOT_IN_ROOM"), body
        # Another admin, not in the Matrix room, may not bridge it.
        other = stack.others["admin"]
        status, body = await api(stack, "POST", path, other, {"matrix_room_id": existing})
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN"), body

        status, bridged = await api(stack, "POST", path, alice, {"matrix_room_id": existing})
        assert status == 200, bridged
        assert (bridged["room_id"], bridged["matrix_room_id"]) == (room_hex, existing)
        for event_type in ("m.bridge", "uk.half-shot.bridge"):
            state = await client.room_get_state_event(
                existing, event_type, f"org.kalandra.bridge://kalandra/{room_hex}"
            )
            assert isinstance(state, RoomGetStateEventResponse), state
            assert (state.content["channel"]["id"], state.content["bridgebot"]) == (
                room_hex,
                BOT,
            )
        status, body = await api(stack, "POST", path, alice, {"matrix_room_id": existing})
        assert (status, body["errcode"]) == (409, "KALANDRA_ALREADY_BRIDGED")


async def bridge_states(stack: BridgeStack, user: str) -> dict[str, Any]:
    """mautrix's bridge-state endpoint (the homeserver's token), for ``@user:localhost``."""
    url = f"http://127.0.0.1:{stack.as_port}/_matrix/app/com.beeper.bridge_state"
    headers = {"Authorization": f"Bearer {config_value(stack, 'appservice', 'hs_token')}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(url, params={"user_id": f"@{user}:localhost"}, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["bridgeState"]["state_event"] == "RUNNING", body
    return dict(body["remoteState"] or {})


@pytest.mark.asyncio(loop_scope="module")
async def test_device_token_logs_in_as_the_bridged_member(stack: BridgeStack) -> None:
    bob = stack.others["user"]
    assert await bridge_states(stack, bob) == {}
    status, issued = await api(stack, "POST", "/device-token", bob)
    assert status == 200, issued
    member_id, token = issued["member_id"], issued["token"]
    assert isinstance(member_id, int)
    assert isinstance(token, str)
    assert issued["token_id"]
    assert token not in stack.log.read_text(errors="replace")  # never logged
    status, me = await api(stack, "GET", "/whoami", bob)
    assert (status, me["permission"], me["kalandra"]) == (200, "user", {"member_id": member_id})
    remote = await bridge_states(stack, bob)
    assert list(remote) == [str(member_id)], remote
    assert remote[str(member_id)]["state_event"] == "CONNECTED", remote

    rows = await query(
        stack.store_url,
        "SELECT signing_key FROM bridge_users WHERE mxid = :m",
        m=f"@{bob}:localhost",
    )
    assert len(rows) == 1
    state_key = base64.b64decode(config_value(stack, "bridge", "mls_state_key"))
    key = sealed.unseal(state_key, "user-signing-key", bytes(rows[0][0]))
    address = ServerAddress("tcp", "127.0.0.1", stack.tcp_port)
    client = Client(ClientCore(member_id, key), address, token, reconnect=False)
    await client.connect()
    assert client.core.member_id == member_id
    assert client.core.session_id
    await client.close()

    # A second token is another one, for the same member.
    status, again = await api(stack, "POST", "/device-token", bob)
    assert status == 200, again
    assert again["member_id"] == member_id
    assert again["token"] != token
