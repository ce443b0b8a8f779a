"""Faults of the whole bridge system, with the real processes: the bridge (`python -m bridge`,
its embedded Kalandra server), its own Synapse, and its database.

While a Matrix user and a native member each send a stream of messages into one portal (and a
commit adds a member half-way through), one of the bridge's dependencies fails hard:

* Synapse is killed with SIGKILL and started again on the same port and data. The Matrix user's
  sends fail meanwhile and it sends them again (same transaction ids, as a real client does);
  only messages Synapse acknowledged with an event id count as sent. Synapse forgets the
  appservice's transaction ids and its unsent queue when it dies: the bridge must neither send
  a ghost message twice nor miss a Matrix message (see bridge/portal/to_matrix.py,
  bridge/appservice/catch_up.py).
* PostgreSQL (the bridge's database) is stopped (connections kicked) and started again. The
  embedded server answers what it could not store with STORAGE_ERROR and the native member
  sends it again; the bridge's pools reconnect and the process stays up.

The second half of each side's messages is sent from the moment the fault is in effect, so
both really meet it.

Afterwards every message is on the other side exactly once, in order, and the epoch agrees
everywhere: the native member's group state, the bridge's own (``!kalandra epoch``) and the
portal's ``org.kalandra.epoch`` state event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from faults.private_postgres import PrivatePostgres
from helpers.markers import marker_to_matrix, marker_to_native
from helpers.matrix import send_numbered
from matrix.bridge_members import account_id, epoch_state, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    PASSWORD,
    BridgeStack,
    bridge_stack,
    command,
    ghost_of,
    ghost_texts,
    messages_from_others,
    native_client,
    nio_client,
)
from nio import AsyncClient, AsyncClientConfig, LoginResponse

from kalandra_core.client.driver import Client, ClientError, NotYetConfirmed
from kalandra_core.client.events import Message
from kalandra_core.mls.errors import PendingCommitExists
from kalandra_core.proto import ErrorCode

COUNT = 200  # messages per direction
FAULT_AFTER = 30  # messages seen on each side before the fault
WITHIN = 300.0  # seconds for everything to arrive on a loaded 2-core machine
BOT_NAME = "kalandrabot"
EPOCH_ANSWER = re.compile(r"Kalandra room `([0-9a-f]{32})`: epoch (\d+),.* (\d+) members,")

# Takes the dependency down, sets the event while it is down, brings it back.
Fault = Callable[[BridgeStack, asyncio.Event], Awaitable[None]]


# --- the faults --------------------------------------------------------------------------------


async def kill9_synapse(stack: BridgeStack, down: asyncio.Event) -> None:
    """SIGKILL Synapse, leave it down a moment, start it again on the same port and data."""
    # An outage, not a blip: sends on both sides fail meanwhile.
    await stack.kill9_synapse(down=3, gone=down)


OUTAGE_SECONDS = 20.0


def restart_postgres(server: PrivatePostgres) -> Fault:
    """Stop the bridge's PostgreSQL server (connections kicked), start it again later."""

    async def fault(_stack: BridgeStack, down: asyncio.Event) -> None:
        try:
            await asyncio.to_thread(server.stop)
            down.set()
            # Connections are gone and new ones are refused for a while: longer than any fixed
            # retry budget of the bridge (an outage is waited out, whatever its length).
            await asyncio.sleep(OUTAGE_SECONDS)
        finally:
            if not server.running():
                await asyncio.to_thread(server.start)

    return fault


# --- the two sides -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fragile_nio(stack: BridgeStack) -> AsyncIterator[AsyncClient]:
    """A Matrix client that gives up on a request as soon as the connection fails (nio would
    retry by itself otherwise): the sender below does its own retrying, like a real client."""
    client = AsyncClient(
        stack.synapse.url,
        stack.synapse.mxid(stack.user),
        config=AsyncClientConfig(max_timeouts=0, request_timeout=20),
    )
    try:
        login = await client.login(PASSWORD, device_name="fault test sender")
        assert isinstance(login, LoginResponse), login
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.logout()
        await client.close()


async def native_sender(
    owner: Client, joiner: Client, room: bytes, down: asyncio.Event, refused: list[int]
) -> None:
    """Send COUNT messages in order, the second half from the moment the fault is in effect,
    adding ``joiner`` (a commit) right after the first of those. A request the server refused
    (its database down) is made again; one merely unconfirmed is not (it is queued and goes out
    once)."""

    async def again(action: Callable[[], Awaitable[int]]) -> int | None:
        while True:
            try:
                return await action()
            except NotYetConfirmed:
                return None
            except (ClientError, PendingCommitExists) as exc:
                if isinstance(exc, ClientError) and exc.code == ErrorCode.STORAGE_ERROR:
                    refused.append(1)
                # Refused (STORAGE_ERROR while the database is down), or the client's own
                # self-update commit is still on its way: once that is settled, again.
                await asyncio.sleep(0.5)
                with contextlib.suppress(TimeoutError):
                    await owner.wait_connected()

    for i in range(COUNT):
        if i == COUNT // 2:
            await down.wait()
        await again(functools.partial(owner.send_text, room, f"native {i}"))
        if i == COUNT // 2:  # its append met the outage; the commit goes in right after
            await again(lambda: owner.invite(room, [joiner.core.member_id]))


async def bridge_epoch(alice: AsyncClient, portal: str) -> tuple[int, int]:
    """(epoch, member count) as ``!kalandra epoch`` answers in the portal."""

    async def ask() -> tuple[int, int] | None:
        answer = await command(alice, portal, "!kalandra epoch", within=60)
        match = EPOCH_ANSWER.search(answer)
        return (int(match[2]), int(match[3])) if match else None

    result: tuple[int, int] = await wait_until(ask, "an answer to !kalandra epoch", 180)
    return result


# --- the scenario ------------------------------------------------------------------------------


async def traffic_through(stack: BridgeStack, fault: Fault) -> tuple[list[int], list[int]]:
    """Both streams through ``fault``, checked; returns the Matrix sends that failed and the
    native requests the Kalandra server refused meanwhile."""
    owner, joiner = await native_client(stack), await native_client(stack)
    bot = await account_id(stack, BOT_NAME)
    async with nio_client(stack.synapse, stack.user) as alice, fragile_nio(stack) as sender:
        room = await native_room(owner, bot, "faults")
        portal = await open_portal(alice, room)
        await sender.join(portal)
        ghost = ghost_of(owner)
        await owner.settle()
        first_epoch = owner.core.rooms[room].epoch

        down = asyncio.Event()
        acked: list[str] = []
        failed: list[int] = []  # Matrix sends that got no answer, by message number
        refused: list[int] = []  # native requests the server refused
        received: list[Message] = []
        tasks = [
            asyncio.create_task(messages_from_others(owner, received, COUNT, room)),
            # The second half from the moment the fault is in effect; a failed send is made
            # again with the same transaction id until Synapse acknowledges it.
            asyncio.create_task(
                send_numbered(
                    sender, portal, COUNT, halfway=down, retry=True, acked=acked, failed=failed
                )
            ),
            asyncio.create_task(native_sender(owner, joiner, room, down, refused)),
        ]
        try:
            async with asyncio.timeout(WITHIN):
                while (  # noqa: ASYNC110 - polling other processes
                    len(received) < FAULT_AFTER
                    or len(await ghost_texts(alice, portal, ghost)) < FAULT_AFTER
                ):
                    await asyncio.sleep(0.5)
            await fault(stack, down)
            async with asyncio.timeout(WITHIN):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # Nothing more (no duplicate) arrives on either side: a marker each way goes behind the
        # messages through the portal's ordered queue (replayed and caught-up Matrix events are
        # handled before a later transaction's; a resent ghost message before later ones), and
        # Matrix shows the native marker once every native message before it is there.
        marker = await marker_to_matrix(owner, room, alice, portal, ghost, WITHIN)
        _, before = await marker_to_native(alice, portal, owner, room, WITHIN)
        late = [m.content.body for m in before]
        seen = await ghost_texts(alice, portal, ghost)
        assert seen[-1].body == marker
        seen = seen[:-1]

        assert len(set(acked)) == len(acked) == COUNT
        assert [m.content.body for m in received] == [f"matrix {i}" for i in range(COUNT)]
        assert late == []
        assert len({m.sender_id for m in received}) == 1  # the Matrix user's puppet leaf
        assert [e.body for e in seen] == [f"native {i}" for i in range(COUNT)]
        assert len({e.event_id for e in seen}) == COUNT

        # The epoch agrees everywhere, and the commit made during the traffic is in it.
        await owner.settle()
        mine = owner.core.rooms[room]
        epoch, roster = mine.epoch, {str(m) for m in mine.roster()}
        assert joiner.core.member_id in mine.roster()
        assert epoch > first_epoch

        async def state_caught_up() -> dict[str, Any] | None:
            state = await epoch_state(alice, portal)
            return state if state is not None and state["epoch"] == epoch else None

        state = await wait_until(state_caught_up, "the portal's epoch state", 120)
        assert state["member_count"] == len(roster)
        assert state["tree_hash"] == mine.group.tree_hash.hex()  # the roster, among the rest
        assert await bridge_epoch(alice, portal) == (epoch, len(roster))
        assert mine.epoch == epoch  # nothing moved while we looked
    await owner.close()
    await joiner.close()
    return failed, refused


@pytest.mark.asyncio
async def test_synapse_killed_in_the_middle_of_traffic(tmp_path: Path) -> None:
    async with bridge_stack(tmp_path, "sqlite") as stack:
        failed, _ = await traffic_through(stack, kill9_synapse)
    assert failed  # the Matrix user really sent into the outage


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_postgres_restarted_in_the_middle_of_traffic(
    tmp_path: Path, postgres: PrivatePostgres
) -> None:
    # asyncpg logs each failed reconnect of its pools with a traceback (at WARNING): that is
    # the outage this test makes, not a failure of the bridge's.
    quiet = {"logging.loggers.asyncpg": {"level": "ERROR"}}
    async with bridge_stack(
        tmp_path, "postgres", options=quiet, pg_admin=postgres.admin_dsn
    ) as stack:
        _, refused = await traffic_through(stack, restart_postgres(postgres))
    # The outage really hit the room's appends: the first frame to meet it is refused (the
    # native member's, or the bridge's for the Matrix user) and the rest wait for the reload.
    assert refused or "append failed" in stack.log.read_text(errors="replace")
