"""Access to Kalandra rooms through the bridge (the access policy, bridge/access.py), against a
real Synapse, the bridge process and native clients, on SQLite and PostgreSQL.

Attacks: a Matrix user (with the `user` permission; `relay` users and strangers get no bot
commands at all) lists, opens and queries rooms they are not in, by bot command and over the
provisioning API;
joins a portal someone made public; is invited by a user without invite power. Each is refused
(or kicked), the answer does not tell whether the room exists, and nothing was sent: no
invitation, no MLS member added, no new epoch, no history read.

Ways in that work: (a) a native member's encrypted invitation (`kalandra invite ROOM @user`),
also into a room that has no portal yet, where a relay user then reads nothing from before the
invitation; (b) an invitation in the portal by a user with invite power; (c) a bridge admin's
`invite ROOM @user`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from matrix.bridge_members import account_id, member_event, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    native_client,
    nio_client,
    open_dm,
    room_history,
    say,
    sync_until,
)
from nio import AsyncClient, InviteMemberEvent, MatrixRoom, RoomMessageText
from ruamel.yaml import YAML

from kalandra_core.client.bridge_invite import invite_content
from kalandra_core.client.driver import Client

PREFIX = "/_matrix/provision/v1"
KEPT = f"kept-history-{secrets.token_hex(4)}"
BEFORE = f"before-the-invitation-{secrets.token_hex(4)}"
KICKED = "Not invited"
SNEAKY = f"uninvited-{secrets.token_hex(4)}"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("access"),
        request.param,
        others=("user", "relay", "stranger"),
        bridge_options={"relay.enabled": True},
        default_level="none",  # the stranger may not use the bridge at all
    ) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rooms(stack: BridgeStack) -> AsyncIterator[dict[str, Any]]:
    """A native owner's room with a portal the admin opened (its kept history backfilled
    there), and another room of the bot that has no portal; both with something said."""
    native = await native_client(stack)
    bot_id = await bot_member(stack)
    opened = await native_room(native, bot_id, "opened")
    await native.send_text(opened, KEPT)
    hidden = await native_room(native, bot_id, "no portal")
    await native.send_text(hidden, KEPT)
    await native.settle()
    async with nio_client(stack.synapse, stack.user) as alice:
        portal = await open_portal(alice, opened)
        await wait_roster(native, opened, 3)  # the admin's bridged member joined
        yield {
            "native": native,
            "alice": alice,
            "opened": opened,
            "hidden": hidden,
            "portal": portal,
        }
    await native.close()


async def bot_member(stack: BridgeStack) -> int:
    return await account_id(stack, "kalandrabot")


async def dm_with_bot(client: AsyncClient) -> str:
    await client.sync(timeout=0)
    dm = await open_dm(client)
    notices = bot_notices(client, dm)
    await sync_until(client, lambda: len(notices) >= 1, "welcome from the bot")
    return dm


def invites_of(client: AsyncClient) -> list[str]:
    """Rooms ``client`` is invited to from now on."""
    seen: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == client.user_id and event.membership == "invite":
            seen.append(room.room_id)

    client.add_event_callback(on_invite, InviteMemberEvent)
    return seen


async def api(stack: BridgeStack, method: str, path: str, user: str) -> tuple[int, dict[str, Any]]:
    config = YAML().load(stack.config.read_text(encoding="utf-8"))
    secret = config["bridge"]["provisioning"]["shared_secret"]
    url = f"http://127.0.0.1:{stack.as_port}{PREFIX}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.request(
            method,
            url,
            params={"user_id": f"@{user}:localhost"},
            headers={"Authorization": f"Bearer {secret}"},
        ) as response,
    ):
        return response.status, await response.json()


def roster(native: Client, room_id: bytes) -> set[int]:
    return set(native.core.rooms[room_id].roster())


async def wait_roster(native: Client, room_id: bytes, size: int) -> set[int]:
    async def check() -> set[int] | None:
        members = roster(native, room_id)
        return members if len(members) == size else None

    result: set[int] = await wait_until(check, f"{size} members in the room")
    return result


async def wait_left(alice: AsyncClient, portal: str, user: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        content = await member_event(alice, portal, user)
        return content if content.get("membership") == "leave" else None

    result: dict[str, Any] = await wait_until(check, f"{user} out of the portal")
    return result


async def join_and_wait(client: AsyncClient, portal: str) -> None:
    await client.join(portal)
    await sync_until(client, lambda: portal in client.rooms, "the join")


def texts(history: list[Any]) -> list[str]:
    return [e.body for e in history if isinstance(e, RoomMessageText)]


@pytest.mark.asyncio(loop_scope="module")
async def test_nobody_lists_opens_or_queries_a_room_they_are_not_in(
    stack: BridgeStack, rooms: dict[str, Any]
) -> None:
    native: Client = rooms["native"]
    opened, hidden = rooms["opened"], rooms["hidden"]
    await native.sync(opened)
    epochs = {r: native.core.rooms[r].epoch for r in (opened, hidden)}
    rosters = {r: roster(native, r) for r in (opened, hidden)}
    fake = secrets.token_hex(16)
    async with nio_client(stack.synapse, stack.others["user"]) as mallory:
        invites = invites_of(mallory)
        dm = await dm_with_bot(mallory)
        listed = await command(mallory, dm, "list")
        assert opened.hex() not in listed, listed
        assert hidden.hex() not in listed, listed
        for real in (opened.hex(), hidden.hex()):
            for verb in ("open", "members", "epoch", "sync", "rotate-keys"):
                answer = await command(mallory, dm, f"{verb} {real}", within=30)
                twin = await command(mallory, dm, f"{verb} {fake}")
                # Refused, in the words used for a room that does not exist.
                assert answer == twin.replace(fake, real), (verb, answer, twin)
                assert "not a Kalandra room you are in" in answer, answer
            answer = await command(mallory, dm, f"members {real[:8]}")
            twin = await command(mallory, dm, f"members {fake[:8]}")
            assert answer == twin.replace(fake[:8], real[:8]), answer
        await mallory.sync(timeout=0)
        assert invites == [], invites
        assert rooms["portal"] not in mallory.rooms
    # Over the provisioning API: the same for a user; relay users and strangers may not ask.
    for role, refusal in (("user", 404), ("relay", 403), ("stranger", 403)):
        name = stack.others[role]
        status, listed_api = await api(stack, "GET", "/rooms", name)
        if role == "user":
            assert status == 200, listed_api
            ids = {r["room_id"] for r in listed_api["rooms"]}
            assert ids.isdisjoint({opened.hex(), hidden.hex()}), ids
        else:
            assert status == 403, listed_api
        for real in (opened.hex(), hidden.hex()):
            status, body = await api(stack, "POST", f"/rooms/{real}/open", name)
            fake_status, fake_body = await api(stack, "POST", f"/rooms/{fake}/open", name)
            assert status == fake_status == refusal, body
            assert body["error"] == fake_body["error"].replace(fake, real), body
    # Nothing happened in either room: no member added, no new epoch, no portal made.
    for room_id in (opened, hidden):
        await native.sync(room_id)
        assert roster(native, room_id) == rosters[room_id]
        assert native.core.rooms[room_id].epoch == epochs[room_id]
    status, everything = await api(stack, "GET", "/rooms", stack.user)
    assert status == 200
    assert everything["admin_view"] is True
    assert hidden.hex() not in {r["room_id"] for r in everything["rooms"]}
    assert opened.hex() in {r["room_id"] for r in everything["rooms"]}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_join_nobody_let_in_is_kicked_and_reads_nothing(
    stack: BridgeStack, rooms: dict[str, Any]
) -> None:
    """A portal made public by hand, and an invitation by a user without invite power in a
    portal whose power levels let anyone invite: the joiner is kicked, never an MLS member,
    never reads the kept history. Between them, (a) and (b) let users in."""
    native: Client = rooms["native"]
    alice: AsyncClient = rooms["alice"]
    opened, portal = rooms["opened"], rooms["portal"]
    stranger_id = f"@{stack.others['stranger']}:localhost"
    before = roster(native, opened)
    put = await alice.room_put_state(portal, "m.room.join_rules", {"join_rule": "public"})
    assert not hasattr(put, "status_code"), put
    async with (
        nio_client(stack.synapse, stack.others["stranger"]) as mallory,
        nio_client(stack.synapse, stack.others["user"]) as bob,
        nio_client(stack.synapse, stack.others["relay"]) as carol,
    ):
        await join_and_wait(mallory, portal)
        # Said at once, before the kick lands (or refused by Synapse after it): never bridged.
        await mallory.room_send(portal, "m.room.message", {"msgtype": "m.text", "body": SNEAKY})
        left = await wait_left(alice, portal, stranger_id)
        assert KICKED in left.get("reason", ""), left
        assert KEPT not in texts(await room_history(mallory, portal))  # history stays hidden
        put = await alice.room_put_state(portal, "m.room.join_rules", {"join_rule": "invite"})
        assert not hasattr(put, "status_code"), put

        # (a): the native member invites bob; bob joins and is an MLS member.
        invites = invites_of(bob)
        await bob.sync(timeout=0)
        await native.send(opened, invite_content(bob.user_id))
        await sync_until(bob, lambda: portal in invites, "the invitation", 60)
        await join_and_wait(bob, portal)
        with_bob = await wait_roster(native, opened, len(before) + 1)
        dm = await dm_with_bot(bob)
        assert opened.hex() in await command(bob, dm, "list")
        assert (await command(bob, dm, f"epoch {opened.hex()}")).startswith("Kalandra room")
        # The command prefix is a whole word: this is a message.
        await say(bob, portal, "!kalandrax help")
        received = [await asyncio.wait_for(native.messages.get(), 60)]
        while received[-1].content.body != "!kalandrax help":
            received.append(await asyncio.wait_for(native.messages.get(), 60))
        assert SNEAKY not in [m.content.body for m in received]  # (it came before bob's)

        # Odd power levels (anyone may invite): bob's invitation does not let carol in.
        levels = await alice.room_get_state_event(portal, "m.room.power_levels")
        content = dict(levels.content)
        content["invite"] = 0
        put = await alice.room_put_state(portal, "m.room.power_levels", content)
        assert not hasattr(put, "status_code"), put
        invited = await bob.room_invite(portal, carol.user_id)
        assert not hasattr(invited, "status_code"), invited  # Synapse let bob invite
        await carol.sync(timeout=0)
        await join_and_wait(carol, portal)
        left = await wait_left(alice, portal, carol.user_id)
        assert KICKED in left.get("reason", ""), left
        assert KEPT not in texts(await room_history(carol, portal))
        await native.sync(opened)
        assert roster(native, opened) == with_bob

        # (b): the admin (power 100) invites carol, who stays (relay: no MLS leaf).
        invited = await alice.room_invite(portal, carol.user_id)
        assert not hasattr(invited, "status_code"), invited
        await carol.sync(timeout=0)
        await join_and_wait(carol, portal)
        # Her message comes after her join in the portal's queue: refused for relaying being
        # off, not for being uninvited, and she is still in.
        answer = await command(carol, portal, "hello from carol")
        assert "relaying" in answer, answer
        assert (await member_event(alice, portal, carol.user_id))["membership"] == "join"
        await native.sync(opened)
        assert roster(native, opened) == with_bob


@pytest.mark.asyncio(loop_scope="module")
async def test_native_and_admin_invitations_into_a_room_without_portal(
    stack: BridgeStack, rooms: dict[str, Any]
) -> None:
    """(a) into a room the bot is in without a portal: the portal is made and the relay user
    invited, who reads nothing from before the invitation and gets no MLS leaf (nor can open
    portals); (c) the admin invites bob, who joins and becomes an MLS member."""
    native: Client = rooms["native"]
    alice: AsyncClient = rooms["alice"]
    room_id = await native_room(native, await bot_member(stack), "invited")
    await native.send_text(room_id, BEFORE)
    await native.settle()
    members = roster(native, room_id)
    async with (
        nio_client(stack.synapse, stack.others["relay"]) as carol,
        nio_client(stack.synapse, stack.others["user"]) as bob,
    ):
        invites = invites_of(carol)
        await carol.sync(timeout=0)
        await native.send(room_id, invite_content(carol.user_id))
        await sync_until(carol, lambda: bool(invites), "the invitation", 60)
        portal = invites[0]
        await join_and_wait(carol, portal)
        after = f"after the invitation {secrets.token_hex(3)}"
        await native.send_text(room_id, after)

        async def seen() -> list[str] | None:
            got = texts(await room_history(carol, portal))
            return got if after in got else None

        got = await wait_until(seen, "the message after the invitation")
        assert BEFORE not in got, got
        assert roster(native, room_id) == members  # a relay user has no leaf
        relay = stack.others["relay"]
        status, body = await api(stack, "POST", f"/rooms/{room_id.hex()}/open", relay)
        assert status == 403, body  # nor can she open the portal again (with its history)

        # (c): the admin lets bob in.
        bob_invites = invites_of(bob)
        await bob.sync(timeout=0)
        admin_dm = await dm_with_bot(alice)
        answer = await command(alice, admin_dm, f"invite {room_id.hex()} {bob.user_id}")
        assert answer.startswith("Invited"), answer
        await sync_until(bob, lambda: portal in bob_invites, "the admin's invitation", 60)
        await join_and_wait(bob, portal)
        await wait_roster(native, room_id, len(members) + 1)
        assert BEFORE not in texts(await room_history(bob, portal))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_portal_opened_up_by_hand_is_invite_only_again_after_a_restart(
    stack: BridgeStack, rooms: dict[str, Any]
) -> None:
    """Portals made before the policy (or changed since) get its rules at start."""
    alice: AsyncClient = rooms["alice"]
    portal = rooms["portal"]
    for event_type, content in (
        ("m.room.join_rules", {"join_rule": "public"}),
        ("m.room.history_visibility", {"history_visibility": "shared"}),
    ):
        put = await alice.room_put_state(portal, event_type, content)
        assert not hasattr(put, "status_code"), put
    await stack.stop_bridge()
    await stack.restart()

    async def rules() -> tuple[Any, Any] | None:
        join = await alice.room_get_state_event(portal, "m.room.join_rules")
        seen = await alice.room_get_state_event(portal, "m.room.history_visibility")
        pair = (
            getattr(join, "content", {}).get("join_rule"),
            getattr(seen, "content", {}).get("history_visibility"),
        )
        return pair if pair == ("invite", "invited") else None

    await wait_until(rules, "the portal's access rules restored")
