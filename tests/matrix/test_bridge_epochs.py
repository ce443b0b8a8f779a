"""Kalandra commits in Matrix, against a real Synapse (SQLite and PostgreSQL): every commit
updates the portal's ``org.kalandra.epoch`` state (epoch, tree hash, suite, member count, from
the bot's MLS state), an added native member's ghost joins under its Kalandra name, a removed one's
leaves, with an epoch notice per change; across a kill -9 in the middle of membership changes,
nothing is lost and no ghost joins or leaves twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix

from bridge.members.bridged_users import member_name
from kalandra_core.client.driver import Client
from matrix.bridge_members import (
    account_id,
    account_name,
    member_event,
    member_events,
    native_room,
    open_portal,
    wait_epoch,
    wait_membership,
    wait_until,
)
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    room_history,
    sync_until,
)

BOT_NAME = "kalandrabot"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    options = {"epoch_notices": True}
    async with bridge_stack(
        tmp_path_factory.mktemp("epochs"), request.param, bridge_options=options
    ) as stack:
        yield stack


async def bridged_member(stack: BridgeStack, mxid: str) -> int:
    """The puppet leaf's member id of a Matrix user, once the bridge has made it."""

    async def check() -> int | None:
        try:
            return await account_id(stack, member_name(mxid))
        except AssertionError:
            return None

    result: int = await wait_until(check, f"a Kalandra account for {mxid}")
    return result


async def in_roster(client: Client, room_id: bytes, member_id: int) -> None:
    await client.wait_for(lambda: member_id in client.core.rooms[room_id].roster())


@pytest.mark.asyncio(loop_scope="module")
async def test_adds_and_removes_move_ghosts_and_epoch(stack: BridgeStack) -> None:
    owner, joiner = await native_client(stack), await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_id = await native_room(owner, bot, "epochs")
        portal = await open_portal(alice, room_id)
        notices = bot_notices(alice, portal)
        me = await bridged_member(stack, alice.user_id)  # alice joined: a puppet leaf
        first = await wait_epoch(alice, portal, {owner.core.member_id, bot, me})
        await in_roster(owner, room_id, me)
        await wait_membership(alice, portal, ghost_of(owner), "join")
        assert first["epoch"] == owner.core.rooms[room_id].epoch
        assert first["tree_hash"] == owner.core.rooms[room_id].group.tree_hash.hex()
        assert first["cipher_suite"] == owner.core.rooms[room_id].group.suite
        # The bot and bridged Matrix users have no ghosts.
        assert await member_event(alice, portal, f"@kalandra_{bot}:localhost") == {}
        assert await member_event(alice, portal, f"@kalandra_{me}:localhost") == {}

        await owner.invite(room_id, [joiner.core.member_id])
        assert await asyncio.wait_for(joiner.joined.get(), 15) == room_id
        await owner.settle()
        added = await wait_epoch(
            alice,
            portal,
            {owner.core.member_id, bot, me, joiner.core.member_id},
            epoch=owner.core.rooms[room_id].epoch,
        )
        assert added["epoch"] == first["epoch"] + 1
        assert added["tree_hash"] != first["tree_hash"]
        assert added["tree_hash"] == owner.core.rooms[room_id].group.tree_hash.hex()
        joined = await wait_membership(alice, portal, ghost_of(joiner), "join")
        name = await account_name(stack, joiner.core.member_id)
        assert joined["displayname"] == f"{name} (Kalandra)"

        await owner.remove(room_id, [joiner.core.member_id])
        await owner.settle()
        removed = await wait_epoch(
            alice, portal, {owner.core.member_id, bot, me}, epoch=added["epoch"] + 1
        )
        assert removed["tree_hash"] == owner.core.rooms[room_id].group.tree_hash.hex()
        await wait_membership(alice, portal, ghost_of(joiner), "leave")

        line = f"Kalandra epoch {added['epoch']} (added {joiner.core.member_id})"
        await sync_until(alice, lambda: line in notices, "the epoch notice", 30)
    await owner.close()
    await joiner.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_membership_changes_survive_kill9_once(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    others = [await native_client(stack) for _ in range(4)]
    bot = await account_id(stack, BOT_NAME)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_id = await native_room(owner, bot, "kill9")
        portal = await open_portal(alice, room_id)
        me = await bridged_member(stack, alice.user_id)
        await wait_epoch(alice, portal, {owner.core.member_id, bot, me})

        # Four commits in a row; kill -9 once Matrix shows the first.
        for other in others:
            await owner.invite(room_id, [other.core.member_id])
        await wait_membership(alice, portal, ghost_of(others[0]), "join")
        await stack.kill9()
        await stack.restart()
        await owner.wait_connected()
        await owner.settle()
        await owner.remove(room_id, [others[0].core.member_id, others[1].core.member_id])
        await owner.settle()

        stay = [o.core.member_id for o in others[2:]]
        final = await wait_epoch(
            alice,
            portal,
            {owner.core.member_id, bot, me, *stay},
            epoch=owner.core.rooms[room_id].epoch,
        )
        assert final["tree_hash"] == owner.core.rooms[room_id].group.tree_hash.hex()
        for other in others[2:]:
            await wait_membership(alice, portal, ghost_of(other), "join")
        for other in others[:2]:
            await wait_membership(alice, portal, ghost_of(other), "leave")
        # Nothing more (no repeat) arrives: the portal's queue toward Matrix mirrors the log
        # in order, so a message of the owner's shows only after every change before it.
        await marker_to_matrix(owner, room_id, alice, portal, ghost_of(owner))

        history = await room_history(alice, portal)
        for other in others:
            changes = [m for m, _ in member_events(history, ghost_of(other))]
            assert changes.count("join") == 1, changes
            assert changes.count("leave") == (1 if other in others[:2] else 0), changes
    for client in (owner, *others):
        await client.close()
