"""A stop or kill -9 of the bridge right after a commit of the bot's, against a real Synapse
(SQLite and PostgreSQL).

The bot's saved room state waits until the portal has mirrored what the group applied (the
state barrier, bridge/bot_state.py), so it can be older than a commit of the bot's that the log
holds. Before the fix, the restarted bot met its own commit in the log without its pending
state ("log index N undecryptable"), stayed at the old epoch, and every later commit of its
was refused (STALE_EPOCH): the room was stuck for the bridge. The same after a demotion
reloaded with SIGHUP (the bot's Remove commit). The bridge runs here with
``KALANDRA_TEST_STATE_LAG`` (items count as mirrored seconds late), so the stop always falls
inside that window, without a race.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    command,
    ghost_of,
    ghost_texts,
    native_client,
    nio_client,
    portal_with_native,
    say,
    sync_until,
    tail,
)
from nio import AsyncClient
from ruamel.yaml import YAML

from kalandra_core.client import events as ev
from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message

LAG = "6"  # seconds: longer than the command's answer takes to reach the test and the stop
ROTATED = re.compile(r"^New keys in `[0-9a-f]{32}`: epoch (\d+) → (\d+) ")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    before = os.environ.get("KALANDRA_TEST_STATE_LAG")
    os.environ["KALANDRA_TEST_STATE_LAG"] = LAG  # read by the bridge processes started here
    try:
        work = tmp_path_factory.mktemp("botcommit")
        async with bridge_stack(work, request.param, others=("user",)) as stack:
            yield stack
    finally:
        if before is None:
            del os.environ["KALANDRA_TEST_STATE_LAG"]
        else:
            os.environ["KALANDRA_TEST_STATE_LAG"] = before


async def rotate(alice: AsyncClient, portal: str) -> tuple[int, int]:
    answer = await command(alice, portal, "!kalandra rotate-keys", within=45)
    match = ROTATED.match(answer)
    assert match, answer
    return int(match.group(1)), int(match.group(2))


async def received(native: Client, body: str, seen: list[Message]) -> None:
    while not any(m.content.body == body for m in seen):
        message = await native.messages.get()
        if message.sender_id != native.core.member_id:
            seen.append(message)


async def in_portal(alice: AsyncClient, portal: str, native: Client, body: str) -> list[str]:
    """The native member's texts in the portal, once ``body`` is among them."""
    ghost = ghost_of(native)
    async with asyncio.timeout(45):
        while body not in (bodies := [e.body for e in await ghost_texts(alice, portal, ghost)]):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return bodies


def demote(stack: BridgeStack, mxid: str) -> None:
    """`relay` for ``mxid`` in the config file, and SIGHUP: the bridge reloads permissions and
    removes the demoted user's member from the room (a Remove commit of the bot's)."""
    yaml = YAML()
    config = yaml.load(stack.config.read_text(encoding="utf-8"))
    config["bridge"]["permissions"][mxid] = "relay"
    with open(stack.config, "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)
    assert stack.bridge is not None
    stack.bridge.send_signal(signal.SIGHUP)


async def removed(native: Client, member_id: int) -> None:
    while True:
        event = await native.events.get()
        if isinstance(event, ev.EpochChanged) and member_id in event.removed:
            return


@pytest.mark.asyncio(loop_scope="module")
async def test_stop_or_kill9_right_after_a_bot_commit_leaves_the_room_working(
    stack: BridgeStack,
) -> None:
    """Three times a commit of the bot's, then at once a stop: rotate-keys and SIGTERM,
    rotate-keys and kill -9, a demotion reloaded with SIGHUP (the bot removes the user's
    member) and kill -9. After each restart the bot commits again, and messages go both ways,
    each exactly once."""
    native = await native_client(stack)
    seen: list[Message] = []
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.others["user"]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "commit then stop")
        room = bytes.fromhex(room_hex)
        await alice.room_invite(portal, bob.user_id)
        await bob.join(portal)
        await sync_until(bob, lambda: portal in bob.rooms, "the join")
        await say(bob, portal, "bob speaking")  # bob's own member says it
        await asyncio.wait_for(received(native, "bob speaking", seen), 45)
        bob_member = seen[-1].sender_id

        rounds = [("rotate", stack.stop_bridge), ("rotate", stack.kill9), ("demote", stack.kill9)]
        for round_, (commit, stop) in enumerate(rounds):
            if commit == "rotate":
                before, after = await rotate(alice, portal)
                assert after == before + 1
            else:
                demote(stack, bob.user_id)
                await asyncio.wait_for(removed(native, bob_member), 45)  # sequenced
            await stop()  # at once: the portal has not mirrored the commit in saved state
            await stack.restart()

            # The bot's group is at the room's epoch: its next commit is taken.
            before, after = await rotate(alice, portal)
            assert after == before + 1
            await native.wait_for(lambda: native.core.rooms[room].epoch == after)  # noqa: B023

            # Both ways, after the restart.
            await native.send_text(room, f"native {round_}")
            await say(alice, portal, f"matrix {round_}")
            await asyncio.wait_for(received(native, f"matrix {round_}", seen), 45)
            await in_portal(alice, portal, native, f"native {round_}")
        assert bob_member not in native.core.rooms[room].roster()

        # Nothing twice: each message once on the other side (a last one each way, so that
        # anything duplicated late has arrived before the count).
        await native.send_text(room, "native last")
        await say(alice, portal, "matrix last")
        await asyncio.wait_for(received(native, "matrix last", seen), 45)
        bodies = await in_portal(alice, portal, native, "native last")
        assert bodies == ["native 0", "native 1", "native 2", "native last"], bodies
        from_matrix = [m.content.body for m in seen if m.room_id == room]
        expected = ["bob speaking", "matrix 0", "matrix 1", "matrix 2", "matrix last"]
        assert from_matrix == expected, from_matrix
    await native.close()
    assert "undecryptable" not in stack.log.read_text(errors="replace"), tail(stack.log)
