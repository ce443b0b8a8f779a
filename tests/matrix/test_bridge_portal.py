"""Portals against a real Synapse: `!kalandra create`, a native member added by the bot, its
messages arriving in Matrix from its ghost in order and exactly once, across a kill -9 of the
bridge in the middle of a batch.

The bridge runs as a process (as in test_bridge_bot.py) on SQLite in a temp dir; the native
user is a `kalandra_core` Client over TCP to the bridge's embedded server, its account made
in the same database file by a second SqlStore (SQLite serialises the two processes).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from nacl.signing import SigningKey
from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    RoomMessagesResponse,
    RoomMessageText,
)
from ruamel.yaml import YAML

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.storage.sql import SqlStore
from matrix.synapse import SYNAPSE_PYTHON, Synapse, free_port, start_synapse
from matrix.test_bridge_bot import (
    PASSWORD,
    _bridge,
    _tail,
    _wait_ready,
    _write_config,
    bot_notices,
    nio_client,
    open_dm,
    say,
    sync_until,
)

BATCH = 20


@dataclass
class PortalStack:
    synapse: Synapse
    work: Path
    config: Path
    log: Path
    as_port: int
    tcp_port: int
    user: str
    bridge: object  # subprocess.Popen[bytes], replaced on restart

    def start_bridge(self) -> None:
        self.bridge = _bridge("-c", str(self.config), cwd=self.work, log=self.log)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PortalStack]:
    if not SYNAPSE_PYTHON.exists():
        pytest.fail(f"{SYNAPSE_PYTHON} is missing: run tests/matrix/install_synapse.sh")
    work = tmp_path_factory.mktemp("portal")
    hs_port, as_port = free_port(), free_port()
    user = f"alice_{secrets.token_hex(3)}"
    config, registration = work / "config.yaml", work / "registration.yaml"
    _write_config(config, hs_port=hs_port, as_port=as_port, user=user)
    yaml = YAML()
    data = yaml.load(config)
    data["bridge"]["permissions"] = {"*": "relay", f"@{user}:localhost": "admin"}
    yaml.dump(data, config)
    generate = _bridge("-g", "-c", str(config), "-r", str(registration), cwd=work)
    out, _ = generate.communicate(timeout=60)
    assert generate.returncode == 0, out.decode(errors="replace")
    synapse = await start_synapse(work / "synapse", registrations=[registration], port=hs_port)
    log = work / "bridge.log"
    stack = PortalStack(
        synapse, work, config, log, as_port, int(data["server"]["tcp_port"]), user, None
    )
    stack.start_bridge()
    try:
        await _wait_ready(stack.bridge, as_port, log)  # type: ignore[arg-type]
        await synapse.register_user(user, PASSWORD)
        yield stack
    finally:
        proc = stack.bridge
        proc.terminate()  # type: ignore[attr-defined]
        await asyncio.to_thread(proc.wait, 15)  # type: ignore[attr-defined]
        await synapse.stop()
    assert "Traceback" not in _tail(log), _tail(log)


async def native_client(stack: PortalStack) -> Client:
    store = await SqlStore.open(f"sqlite:///{stack.work / 'kalandra.db'}", migrate=False)
    try:
        account = await store.create_member(f"native_{secrets.token_hex(3)}")
        token = await store.issue_token(account.member_id)
    finally:
        await store.close()
    core = ClientCore(account.member_id, bytes(SigningKey.generate()))
    client = Client(core, ServerAddress("tcp", "127.0.0.1", stack.tcp_port), token)
    await client.connect()
    await client.publish_key_packages(2)
    return client


async def ghost_history(client: AsyncClient, room_id: str, ghost: str) -> list[tuple[str, str]]:
    """The ghost's messages in the room, oldest first, from the room's history (a sync's
    timeline is cut to its last events after a burst, so callbacks alone would miss some)."""
    await client.sync(timeout=0)
    token, events = client.next_batch, []
    while True:
        page = await client.room_messages(room_id, start=token, limit=100)
        assert isinstance(page, RoomMessagesResponse), page
        events += page.chunk
        if not page.chunk or page.end is None:
            break
        token = page.end
    return [
        (event.event_id, event.body)
        for event in reversed(events)
        if isinstance(event, RoomMessageText) and event.sender == ghost
    ]


async def wait_history(
    client: AsyncClient, room_id: str, ghost: str, count: int, within: float = 60.0
) -> list[tuple[str, str]]:
    async with asyncio.timeout(within):
        while len(seen := await ghost_history(client, room_id, ghost)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return seen


async def portal_with_native(alice: AsyncClient, native: Client, name: str) -> tuple[str, str]:
    """Through the bot's DM: create a portal named ``name``, join it as ``alice``, and have the
    bot add the native member to its Kalandra room. Returns (room hex, portal room id)."""
    await alice.sync(timeout=0)
    dm = await open_dm(alice)
    notices = bot_notices(alice, dm)
    await sync_until(alice, lambda: len(notices) >= 1, "welcome from the bot")
    invites: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == alice.user_id and event.membership == "invite":
            invites.append(room.room_id)

    alice.add_event_callback(on_invite, InviteMemberEvent)  # type: ignore[arg-type]
    await say(alice, dm, f"!kalandra create {name}")
    await sync_until(alice, lambda: len(notices) >= 2 and bool(invites), "the portal")
    match = re.search(r"Created Kalandra room `([0-9a-f]{32})`", notices[1])
    assert match, notices[1]
    room_hex = match.group(1)
    portal = invites[0]
    await alice.join(portal)
    await sync_until(alice, lambda: portal in alice.rooms, "the join")
    await say(alice, dm, f"!kalandra invite {room_hex} {native.core.member_id}")
    await sync_until(alice, lambda: len(notices) >= 3, "the invite's answer")
    assert notices[2].startswith("Added member"), notices[2]
    assert await asyncio.wait_for(native.joined.get(), 15) == bytes.fromhex(room_hex)
    await native.settle()
    return room_hex, portal


@pytest.mark.asyncio(loop_scope="module")
async def test_native_messages_reach_matrix_once_in_order_across_kill9(
    stack: PortalStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "test")
        assert alice.rooms[portal].name == "test"
        ghost = f"@kalandra_{native.core.member_id}:localhost"

        room_id = bytes.fromhex(room_hex)
        for i in range(BATCH):
            await native.send_text(room_id, f"message {i}")
        # Kill -9 while the batch is still flowing toward Matrix (the bridge has all of it
        # in the Kalandra log; Synapse has only part of it).
        await wait_history(alice, portal, ghost, 3)

        stack.bridge.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
        await asyncio.to_thread(stack.bridge.wait, 15)  # type: ignore[attr-defined]
        stack.start_bridge()
        await _wait_ready(stack.bridge, stack.as_port, stack.log)  # type: ignore[arg-type]
        await native.wait_connected()
        for i in range(BATCH, 2 * BATCH):
            await native.send_text(room_id, f"message {i}")
        await wait_history(alice, portal, ghost, 2 * BATCH)
        # A little longer: nothing more (no duplicate) arrives.
        await asyncio.sleep(2)
        seen = await ghost_history(alice, portal, ghost)

        assert [body for _, body in seen] == [f"message {i}" for i in range(2 * BATCH)]
        assert len({event_id for event_id, _ in seen}) == 2 * BATCH
    await native.close()
