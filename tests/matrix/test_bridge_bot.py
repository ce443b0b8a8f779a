"""The bridge bot against a real Synapse: `python -m bridge` as a process, nio as the users
(one with the `user` permission, one stranger with only `relay`), one stack for the module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from nio import MatrixRoom, RoomCreateResponse, RoomMemberEvent

from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bot_notices,
    bridge_stack,
    nio_client,
    open_dm,
    say,
    sync_until,
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    work: Path = tmp_path_factory.mktemp("bridge")
    async with bridge_stack(work, others=("user", "stranger")) as stack:
        yield stack


@pytest.mark.asyncio(loop_scope="module")
async def test_commands_in_the_management_room(stack: BridgeStack) -> None:
    async with nio_client(stack.synapse, stack.others["user"]) as alice:
        await alice.sync(timeout=0)
        room_id = await open_dm(alice)
        notices = bot_notices(alice, room_id)
        await sync_until(alice, lambda: len(notices) >= 1, "welcome from the bot")
        assert "Kalandra bridge bot" in notices[0]

        await say(alice, room_id, "ping")  # no prefix needed in a DM with the bot
        await sync_until(alice, lambda: len(notices) >= 2, "answer to ping")
        assert notices[1].startswith("Pong: the Kalandra server is up (tcp port ")
        assert "Your permission level: `user`" in notices[1]

        await say(alice, room_id, "!kalandra version")  # the prefix works too
        await sync_until(alice, lambda: len(notices) >= 3, "answer to version")
        assert notices[2].startswith("Kalandra Bridge ")

        await say(alice, room_id, "help")
        await sync_until(alice, lambda: len(notices) >= 4, "answer to help")
        assert "This is a management room" in notices[3]
        for command in ("**help**", "**version**", "**ping**"):
            assert command in notices[3]
        assert "login-matrix" not in notices[3]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_user_without_permission_is_refused(stack: BridgeStack) -> None:
    async with nio_client(stack.synapse, stack.others["stranger"]) as mallory:
        await mallory.sync(timeout=0)
        room_id = await open_dm(mallory)
        left: list[str] = []

        async def on_member(room: MatrixRoom, event: RoomMemberEvent) -> None:
            if room.room_id == room_id and event.state_key == BOT:
                left.append(event.membership)

        mallory.add_event_callback(on_member, RoomMemberEvent)
        notices = bot_notices(mallory, room_id)
        await sync_until(mallory, lambda: "leave" in left, "the bot leaving")
        assert notices == [
            "You are not allowed to use this bridge. A bridge admin can give you the `user`"
            " permission in the `bridge.permissions` section of the bridge's config."
        ]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_command_without_permission_in_a_shared_room_is_refused(
    stack: BridgeStack,
) -> None:
    async with (
        nio_client(stack.synapse, stack.others["user"]) as alice,
        nio_client(stack.synapse, stack.others["stranger"]) as mallory,
    ):
        created = await alice.room_create(invite=[BOT, mallory.user_id])
        assert isinstance(created, RoomCreateResponse), created
        room_id = created.room_id
        await mallory.sync(timeout=0)
        notices = bot_notices(mallory, room_id)
        await sync_until(mallory, lambda: room_id in mallory.invited_rooms, "the invite")
        await mallory.join(room_id)
        # (The bot joined while alice was the only member: mautrix took it for a DM then.)
        await sync_until(mallory, lambda: len(notices) >= 1, "the bot's welcome")

        await say(mallory, room_id, "ping")  # not a command here: no prefix, no answer
        await say(mallory, room_id, "!kalandra ping")
        await sync_until(mallory, lambda: len(notices) >= 2, "the refusal")
        assert notices[1].startswith("You are not allowed to use this bridge.")
        await say(alice, room_id, "!kalandra ping")
        await sync_until(mallory, lambda: len(notices) >= 3, "the answer to alice")
        assert notices[2].startswith("Pong")
        assert len(notices) == 3
