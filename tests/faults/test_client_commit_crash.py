"""A native client that crashes the moment a commit of its own leaves it, with a real server
(SQLite and PostgreSQL) and the client's real state file.

The commit is in the log; the state on disk is whatever was written before the frame went out.
Before the fix nothing was: the room state on disk was from before the commit, without its
pending MLS state, so the restarted client could not process its own commit from the log
(a member cannot), stayed at the old epoch and had every later commit refused (STALE_EPOCH).
Now a commit of ours goes out only once saved (write-ahead), and the restarted client merges
it from the log like the live one would.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.state import ClientState
from kalandra_core.proto import Frame, Opcode
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import ServerConfig


async def _client(
    server: RunningServer, member_id: int, key: bytes, token: str, state: ClientState | None
) -> Client:
    assert server.tcp_port is not None
    client = Client(
        ClientCore(member_id, key),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        token,
        state=state,
        reconnect=False,
    )
    if state is not None:
        state.load_into(client.core)
    await client.connect()
    return client


def _copy_state(state: ClientState, to: Path) -> None:
    """The state file as a crash at this moment would leave it (and its key)."""
    with sqlite3.connect(to) as copy:
        state._db.backup(copy)
    shutil.copy(state.path.with_suffix(".key"), to.with_suffix(".key"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.mark.asyncio
@pytest.mark.parametrize("delivered", [True, False], ids=["sequenced", "never-received"])
async def test_a_crash_as_a_commit_leaves_the_client_loses_nothing(
    db_url: str, delivered: bool, tmp_path: Path
) -> None:
    """``sequenced``: the server got the commit (the log has it); ``never-received``: the
    crash came first (the restarted client sends the same commit again)."""
    config = ServerConfig(database=db_url, tcp_port=0, quic_port=None, data_dir=tmp_path)
    server = await start_server(config)
    try:
        store = server.store
        accounts = [await store.create_member(name) for name in ("alice", "bob")]
        tokens = [await store.issue_token(a.member_id) for a in accounts]
        keys = [bytes(SigningKey.generate()) for _ in accounts]
        state = ClientState(tmp_path / "alice" / "state.db")
        alice = await _client(server, accounts[0].member_id, keys[0], tokens[0], state)
        bob = await _client(server, accounts[1].member_id, keys[1], tokens[1], None)
        await bob.publish_key_packages(1)
        room_id = await alice.create_room()
        await alice.invite(room_id, [bob.core.member_id])
        await bob.wait_for(lambda: room_id in bob.core.rooms)
        await bob.settle()
        epoch = alice.core.rooms[room_id].epoch

        # The crash: the state file as it is when the commit frame leaves.
        crashed = tmp_path / "crashed" / "state.db"
        crashed.parent.mkdir()
        send = alice._send

        def send_and_crash(data: bytes) -> None:
            if Frame.decode(data).header.opcode == Opcode.COMMIT and not crashed.exists():
                _copy_state(state, crashed)
                if not delivered:
                    return
            send(data)

        alice._send = send_and_crash  # type: ignore[method-assign]
        if delivered:
            await alice.self_update(room_id)
        else:
            alice.core.self_update(room_id, now=alice.clock())
            alice._handle(alice.core.transmit(now=alice.clock()))
            await alice.wait_for(crashed.exists)
        await alice.close()
        state.close()

        # The restart, from what the crash left.
        restarted_state = ClientState(crashed)
        again = await _client(server, accounts[0].member_id, keys[0], tokens[0], restarted_state)
        await bob.wait_for(lambda: bob.core.rooms[room_id].epoch == epoch + 1)
        await again.wait_for(lambda: again.core.rooms[room_id].epoch == epoch + 1)
        await again.settle()
        room = again.core.rooms[room_id]
        assert room.epoch == epoch + 1
        assert room.group.epoch_authenticator == bob.core.rooms[room_id].group.epoch_authenticator
        # Its next commit is taken, and messages go both ways on the new epoch.
        await again.self_update(room_id)
        await bob.wait_for(lambda: bob.core.rooms[room_id].epoch == epoch + 2)
        await again.send_text(room_id, "after the crash")
        await bob.send_text(room_id, "seen")
        async with asyncio.timeout(15):
            while (await bob.messages.get()).content.body != "after the crash":
                pass
            while (await again.messages.get()).content.body != "seen":
                pass
        await again.close()
        restarted_state.close()
        await bob.close()
    finally:
        await server.close()
