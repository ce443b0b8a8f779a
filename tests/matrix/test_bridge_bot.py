"""The bridge bot against a real Synapse: `python -m bridge` as a process, nio as the user.

One Synapse of this module's own (the session one carries another appservice with the same
sender_localpart), registered with what `python -m bridge -g` wrote; one bridge process on
SQLite in a temp dir, for the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from nio import (
    AsyncClient,
    LoginResponse,
    MatrixRoom,
    RoomCreateResponse,
    RoomMemberEvent,
    RoomMessageNotice,
    RoomSendResponse,
    SyncResponse,
)
from ruamel.yaml import YAML

from matrix.synapse import SYNAPSE_PYTHON, Synapse, free_port, start_synapse

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example-config.yaml"
PASSWORD = "correct horse battery staple"
BOT = "@kalandrabot:localhost"
READY_TIMEOUT = 60.0


@dataclass
class Stack:
    synapse: Synapse
    bridge: subprocess.Popen[bytes]
    log: Path
    user: str  # localpart with the `user` permission
    stranger: str  # localpart with only `relay`


def _write_config(path: Path, *, hs_port: int, as_port: int, user: str) -> None:
    yaml = YAML()
    with open(EXAMPLE, encoding="utf-8") as fh:
        config = yaml.load(fh)
    config["database"]["url"] = "sqlite:///kalandra.db"
    config["server"]["tcp_port"] = free_port()
    config["server"]["quic_port"] = None
    config["homeserver"]["address"] = f"http://127.0.0.1:{hs_port}"
    config["homeserver"]["domain"] = "localhost"
    config["appservice"]["address"] = f"http://127.0.0.1:{as_port}"
    config["appservice"]["port"] = as_port
    # The bot's device for end-to-bridge encryption is not what this test is about.
    config["bridge"]["encryption"]["allow"] = False
    config["bridge"]["permissions"] = {"*": "relay", f"@{user}:localhost": "user"}
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)


def _bridge(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def _wait_ready(bridge: subprocess.Popen[bytes], port: int, log: Path) -> None:
    url = f"http://127.0.0.1:{port}/_matrix/mau/ready"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with asyncio.timeout(READY_TIMEOUT):
            while bridge.poll() is None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.2)
    raise AssertionError(f"bridge exited with {bridge.returncode}:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    if not SYNAPSE_PYTHON.exists():
        pytest.fail(f"{SYNAPSE_PYTHON} is missing: run tests/matrix/install_synapse.sh")
    work = tmp_path_factory.mktemp("bridge")
    hs_port, as_port = free_port(), free_port()
    user, stranger = f"alice_{secrets.token_hex(3)}", f"mallory_{secrets.token_hex(3)}"
    config, registration = work / "config.yaml", work / "registration.yaml"
    _write_config(config, hs_port=hs_port, as_port=as_port, user=user)
    generate = _bridge("-g", "-c", str(config), "-r", str(registration), cwd=work)
    out, _ = generate.communicate(timeout=60)
    assert generate.returncode == 0, out.decode(errors="replace")

    synapse = await start_synapse(work / "synapse", registrations=[registration], port=hs_port)
    log = work / "bridge.log"
    bridge = _bridge("-c", str(config), cwd=work, log=log)
    try:
        await _wait_ready(bridge, as_port, log)
        for localpart in (user, stranger):
            await synapse.register_user(localpart, PASSWORD)
        yield Stack(synapse, bridge, log, user, stranger)
    finally:
        bridge.terminate()
        try:
            await asyncio.to_thread(bridge.wait, 15)
        except subprocess.TimeoutExpired:
            bridge.kill()
        await synapse.stop()
    assert "Traceback" not in _tail(log), _tail(log)


@asynccontextmanager
async def nio_client(synapse: Synapse, localpart: str) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(synapse.url, synapse.mxid(localpart))
    try:
        login = await client.login(PASSWORD, device_name="bridge bot test")
        assert isinstance(login, LoginResponse), login
        yield client
    finally:
        if client.logged_in:
            await client.logout()
        await client.close()


def bot_notices(client: AsyncClient, room_id: str) -> list[str]:
    """Bodies of the notices the bot sends in `room_id` from now on (nio keeps callbacks for
    the client's lifetime: one client per test)."""
    seen: list[str] = []

    async def on_notice(room: MatrixRoom, event: RoomMessageNotice) -> None:
        if room.room_id == room_id and event.sender == BOT:
            seen.append(event.body)

    client.add_event_callback(on_notice, RoomMessageNotice)
    return seen


async def sync_until(
    client: AsyncClient, predicate: Callable[[], bool], what: str, within: float = 15.0
) -> None:
    try:
        async with asyncio.timeout(within):
            while not predicate():
                response = await client.sync(timeout=500)
                assert isinstance(response, SyncResponse), response
    except TimeoutError:
        raise AssertionError(f"{client.user_id}: no {what} after {within} s") from None


async def open_dm(client: AsyncClient) -> str:
    created = await client.room_create(invite=[BOT], is_direct=True)
    assert isinstance(created, RoomCreateResponse), created
    return created.room_id


async def say(client: AsyncClient, room_id: str, body: str) -> None:
    sent = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(sent, RoomSendResponse), sent


@pytest.mark.asyncio(loop_scope="module")
async def test_commands_in_the_management_room(stack: Stack) -> None:
    async with nio_client(stack.synapse, stack.user) as alice:
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
async def test_a_user_without_permission_is_refused(stack: Stack) -> None:
    async with nio_client(stack.synapse, stack.stranger) as mallory:
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
async def test_a_command_without_permission_in_a_shared_room_is_refused(stack: Stack) -> None:
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.stranger) as mallory,
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
