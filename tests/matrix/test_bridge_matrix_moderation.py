"""Matrix-side membership and moderation reach Kalandra, against a real Synapse: a Matrix
redaction of a bridged message becomes a Kalandra Redact of its log index; a bridged user who
leaves the portal is removed from the Kalandra group (a Remove commit); a Matrix admin's kick
and ban of native members' ghosts become Kalandra Kick and Ban, and the removed members' leaves
are committed out of the group even when the member whose turn it is to commit is a puppet
leaf the bridge holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from helpers.native import next_event, next_from_others
from nio import AsyncClient, RoomGetStateEventResponse, RoomRedactResponse

from kalandra_core.client import events as ev
from kalandra_core.client.driver import Client
from matrix.bridge_stack import (
    BridgeStack,
    bridge_stack,
    command,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
    say,
    sync_until,
)

WITHIN = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("moderation"), "sqlite", others=("user",)
    ) as s:
        yield s


async def power_of(reader: AsyncClient, room_id: str, user_id: str) -> int:
    """``user_id``'s power level in the room, as the room's state says."""
    state = await reader.room_get_state_event(room_id, "m.room.power_levels")
    assert isinstance(state, RoomGetStateEventResponse), state
    return int(state.content.get("users", {}).get(user_id, 0))


async def add_native(alice_room: Any, stack: BridgeStack, room_hex: str) -> Client:
    alice, portal = alice_room
    member = await native_client(stack)
    answer = await command(alice, portal, f"!kalandra invite {room_hex} {member.core.member_id}")
    assert answer.startswith("Added member"), answer
    assert await asyncio.wait_for(member.joined.get(), WITHIN) == bytes.fromhex(room_hex)
    await member.settle()
    return member


def removed(member_id: int) -> Callable[[ev.EpochChanged], bool]:
    return lambda e: member_id in e.removed


def moderated(action: str, target: int) -> Callable[[ev.Moderated], bool]:
    return lambda e: e.action == action and e.target == target


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_leave_kick_ban_and_redaction_reach_kalandra(stack: BridgeStack) -> None:
    observer = await native_client(stack)
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.others["user"]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, observer, "moderation")
        kicked = await add_native((alice, portal), stack, room_hex)
        banned = await add_native((alice, portal), stack, room_hex)
        # The portal made alice (a bridge admin) a room admin: she moderates from Matrix.
        assert await power_of(alice, portal, alice.user_id) == 100

        # Bob (a bridged user) joins and speaks: his puppet leaf is a member.
        await alice.room_invite(portal, bob.user_id)
        await bob.join(portal)
        await sync_until(bob, lambda: portal in bob.rooms, "the join")
        await say(bob, portal, "bob was here")
        bob_member = (await next_from_others(observer, "bob was here")).sender_id
        # ... added by a commit the native member saw, before his message: a new epoch.
        added = await next_event(observer, ev.EpochChanged, lambda e: bob_member in e.added)
        assert bob_member in added.members

        # A redaction of a bridged message: a Kalandra Redact of that log index.
        doomed = await say(alice, portal, "to be redacted")
        doomed_index = (await next_from_others(observer, "to be redacted")).log_index
        redacted = await alice.room_redact(portal, doomed, reason="oops")
        assert isinstance(redacted, RoomRedactResponse), redacted
        event = await next_event(observer, ev.Moderated, moderated("redact", doomed_index))
        assert event.reason == "oops"

        # Bob leaves the portal: the bot commits his removal.
        await bob.room_leave(portal)
        await next_event(observer, ev.EpochChanged, removed(bob_member))

        # Kick and ban of the ghosts by a Matrix admin.
        await alice.room_kick(portal, ghost_of(kicked), reason="out")
        await next_event(kicked, ev.Left)
        await next_event(observer, ev.Moderated, moderated("kick", kicked.core.member_id))
        await next_event(observer, ev.EpochChanged, removed(kicked.core.member_id))

        await alice.room_ban(portal, ghost_of(banned), reason="gone")
        await next_event(banned, ev.Left)
        await next_event(observer, ev.Moderated, moderated("ban", banned.core.member_id))
        await next_event(observer, ev.EpochChanged, removed(banned.core.member_id))

        # The group goes on: the observer still gets a bridged message.
        await say(alice, portal, "still here")
        await next_from_others(observer, "still here")
    for client in (observer, kicked, banned):
        await client.close()
