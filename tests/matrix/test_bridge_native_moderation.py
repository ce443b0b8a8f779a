"""Kalandra moderation in Matrix, against a real Synapse: the native owner of a room kicks,
bans and unbans native members (their ghosts are kicked, banned, unbanned by the bot, with the
reason), kicks a bridged Matrix user (that user is kicked from the portal), and redacts
bridged messages (by the author's ghost when the owner redacts its own message, else by the
bot).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from helpers.markers import marker_to_matrix, marker_to_native
from nio import AsyncClient, RoomGetEventResponse

from kalandra_core.client.driver import Client
from matrix.bridge_members import (
    account_id,
    member_event,
    native_room,
    open_portal,
    wait_membership,
    wait_until,
)
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    wait_history,
)
from matrix.test_bridge_epochs import BOT_NAME, bridged_member


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("moderation"), others=("user",)) as stack:
        yield stack


async def redaction_of(client: AsyncClient, room_id: str, event_id: str) -> dict[str, Any]:
    """The redaction event of a redacted event, once it is redacted."""

    async def check() -> dict[str, Any] | None:
        response = await client.room_get_event(room_id, event_id)
        assert isinstance(response, RoomGetEventResponse), response
        unsigned = response.event.source.get("unsigned", {})
        because: dict[str, Any] | None = unsigned.get("redacted_because")
        return because

    result: dict[str, Any] = await wait_until(check, f"a redaction of {event_id}")
    return result


async def wait_in_roster(client: Client, room_id: bytes, member_id: int) -> None:
    async def check() -> bool:
        return member_id in client.core.rooms[room_id].roster()

    await wait_until(check, f"member {member_id} in the group")


@pytest.mark.asyncio(loop_scope="module")
async def test_kalandra_moderation_reaches_matrix(stack: BridgeStack) -> None:
    owner = await native_client(stack)
    kicked, banned, author = [await native_client(stack) for _ in range(3)]
    bot = await account_id(stack, BOT_NAME)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_id = await native_room(owner, bot, "moderation")
        natives = [kicked.core.member_id, banned.core.member_id, author.core.member_id]
        await owner.invite(room_id, natives)
        await owner.settle()
        portal = await open_portal(alice, room_id)
        for native in (kicked, banned, author):
            await wait_membership(alice, portal, ghost_of(native), "join")

        # Kick and ban of native members: their ghosts, by the bot, with the reason.
        await owner.moderate(room_id, "kick", kicked.core.member_id, "spam")
        content = await wait_membership(alice, portal, ghost_of(kicked), "leave")
        assert content.get("reason") == "spam"
        await owner.moderate(room_id, "ban", banned.core.member_id, "abuse")
        content = await wait_membership(alice, portal, ghost_of(banned), "ban")
        assert content.get("reason") == "abuse"
        await owner.moderate(room_id, "unban", banned.core.member_id)
        await wait_membership(alice, portal, ghost_of(banned), "leave")

        # Redactions: of another member's message by the bot, of one's own by one's ghost.
        index = await author.send_text(room_id, "to be redacted")
        ((other_event, _),) = await wait_history(alice, portal, ghost_of(author), 1)
        await owner.moderate(room_id, "redact", index, "cleanup")
        redaction = await redaction_of(alice, portal, other_event)
        assert redaction["sender"] == BOT
        assert redaction["content"].get("reason") == "cleanup"
        own_index = await owner.send_text(room_id, "my own")
        ((own_event, _),) = await wait_history(alice, portal, ghost_of(owner), 1)
        await owner.moderate(room_id, "redact", own_index)
        redaction = await redaction_of(alice, portal, own_event)
        assert redaction["sender"] == ghost_of(owner)

        # A bridged Matrix user kicked in Kalandra is kicked from the portal.
        async with nio_client(stack.synapse, stack.others["user"]) as bob:
            invited = await alice.room_invite(portal, bob.user_id)
            assert not hasattr(invited, "status_code"), invited
            await bob.join(portal)
            puppet = await bridged_member(stack, bob.user_id)
            await wait_in_roster(owner, room_id, puppet)
            await owner.moderate(room_id, "kick", puppet, "bye")
            content = await wait_membership(alice, portal, bob.user_id, "leave")
            assert content.get("reason") == "bye"
        # Kicked once: nothing brought the ghost back, not before a marker each way (the
        # portal's queues keep the order: what the bridge did for the kicks, and anything it
        # sent back, goes before them).
        await marker_to_native(alice, portal, owner, room_id)
        await marker_to_matrix(owner, room_id, alice, portal, ghost_of(owner))
        assert (await member_event(alice, portal, ghost_of(kicked))).get("membership") == "leave"
    for client in (owner, kicked, banned, author):
        await client.close()
