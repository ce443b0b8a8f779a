"""`make run`'s system (python -m bridge.devstack) as a newcomer uses it: it prints how to log in,
the Matrix admin it made can talk to the bot, the native account's printed `kalandra login` line
works against the embedded server, the printed first conversation works as printed (its shell lines
run in a shell, the Matrix side done by an E2EE client: the portal is encrypted, the bot's device
cross-signed, and the bridge's member id printed is the bot's), a crash of the bridge (kill -9) and
a stop of the bridge alone (the printed restart command) leave Synapse running, say what happened
and bring the bridge back, Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and
SIGTERM stop everything cleanly with status 0 and no process left, and a second run reuses the
accounts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    LoginResponse,
    MatrixRoom,
    RoomMessageText,
)
from nio.store import SqliteMemoryStore

from matrix.bridge_stack import BOT, REPO, bot_notices, open_dm, say, sync_until
from matrix.synapse import free_port

RUNNING = "Kalandra Bridge is running"


class Devstack:
    """The devstack process (in its own process group, as `make run` in a terminal) and what
    it printed so far."""

    def __init__(self, data: Path, ports: list[str]) -> None:
        self.data = data
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.devstack", "--data", str(data), *ports],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.out = ""
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await asyncio.to_thread(self.proc.stdout.readline):
            self.out += line.decode(errors="replace")

    async def until(self, text: str, *, after: int = 0, within: float = 120) -> int:
        """Wait until ``text`` is printed after offset ``after``; returns the offset after it."""
        try:
            async with asyncio.timeout(within):
                while (found := self.out.find(text, after)) < 0:
                    assert self.proc.poll() is None or not self._reader.done(), (
                        f"devstack exited ({self.proc.returncode}) before {text!r}:\n{self.out}"
                    )
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"no {text!r} after {within} s:\n{self.out}") from None
        return found + len(text)

    def bridge_pid(self) -> int:
        pids = _pids(b"bridge", str(self.data / "config.yaml"))
        assert len(pids) == 1, pids
        return pids[0]

    async def stop(self, how: str) -> None:
        """Ctrl-C as a terminal sends it (to the whole group), or SIGTERM to the devstack."""
        if how == "ctrl-c":
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 60)
        await self._reader
        assert code == 0, self.out
        assert "Traceback" not in self.out, self.out
        assert self.out.rstrip().endswith("stopped"), self.out


def _pids(module: bytes, config: str) -> list[int]:
    """The processes running ``python -m MODULE`` with ``config`` on their command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module in argv and any(config.encode() in arg for arg in argv):
                pids.append(int(entry.name))
    return pids


def _synapse_pids(data: Path) -> list[int]:
    return _pids(b"synapse.app.homeserver", str(data / "synapse"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _ping(client: AsyncClient, dm: str, notices: list[str]) -> None:
    count = len(notices)
    await say(client, dm, "ping")
    await sync_until(client, lambda: len(notices) > count, "pong", within=60)
    assert notices[count].startswith("Pong: the Kalandra server is up"), notices


def _conversation(printed: str) -> tuple[list[str], list[str]]:
    """The printed first conversation's shell lines: before the Matrix step, and after it."""
    text = printed.split("Paste these lines into a shell", 1)[1].split("\n", 1)[1]
    before, after = text.split("In the Matrix client:", 1)
    after = after.split("\n\n", 1)[0].split("\n", 1)[1]

    def shell(block: str) -> list[str]:
        return [line.strip() for line in block.splitlines() if line.startswith("  ")]

    return shell(before), shell(after)


async def _shell(script: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-ec", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{script}\n{done.stdout}{done.stderr}"
    return done.stdout


async def _bot_cross_signed(client: AsyncClient) -> bool:
    response = await client.send(
        "POST",
        "/_matrix/client/v3/keys/query",
        json.dumps({"device_keys": {BOT: []}}),
        headers={"Authorization": f"Bearer {client.access_token}"},
    )
    keys = await response.json()
    self_signing = keys.get("self_signing_keys", {}).get(BOT, {}).get("keys", {})
    devices = keys["device_keys"].get(BOT, {})
    return len(devices) == 1 and any(
        key_id in device["signatures"].get(BOT, {})
        for device in devices.values()
        for key_id in self_signing
    )


async def _first_conversation(printed: str, client: AsyncClient, alice_ghost: str) -> None:
    """Runs the printed first conversation: its shell lines as printed, the Matrix side as the
    printed account in an E2EE client."""
    before, after = _conversation(printed)
    assert len(before) == 3, before
    assert before[0].startswith("K="), before
    assert not any("publish-key-packages" in line for line in before + after)
    invites: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == client.user_id and event.membership == "invite":
            invites.append(room.room_id)

    client.add_event_callback(on_invite, InviteMemberEvent)
    out = await _shell("\n".join(before))
    room = out.strip().splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{32}", room), out
    assert "invited @admin:localhost through the bridge" in out, out

    # "accept the invitation to the room `demo`, open it and type: hello from Matrix"
    await sync_until(client, lambda: bool(invites), "the invitation to demo", within=60)
    portal = invites[0]
    await client.join(portal)
    await sync_until(client, lambda: portal in client.rooms, "the join", within=30)
    assert client.rooms[portal].encrypted
    assert client.rooms[portal].name == "demo"
    await say(client, portal, "hello from Matrix")

    # Then the lines after it, in the same shell variables: tail shows it, send goes over.
    prefix = f"{before[0]}\nROOM={room}\n"
    tail_line, send_line = after
    assert " tail " in tail_line, after
    assert " send " in send_line, after
    tail = await asyncio.create_subprocess_exec(
        "bash",
        "-ec",
        prefix + "exec " + tail_line,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        seen = b""
        async with asyncio.timeout(60):
            assert tail.stdout is not None
            while b"hello from Matrix" not in seen:
                line = await tail.stdout.readline()
                assert line, seen
                seen += line
    finally:
        tail.send_signal(signal.SIGINT)  # Ctrl-C ends tail
        assert await asyncio.wait_for(tail.wait(), 30) == 0
    texts: list[RoomMessageText] = []

    async def on_text(room: MatrixRoom, event: RoomMessageText) -> None:
        if room.room_id == portal and event.sender == alice_ghost:
            texts.append(event)

    client.add_event_callback(on_text, RoomMessageText)
    await _shell(prefix + send_line)
    await sync_until(client, lambda: bool(texts), "alice's message", within=60)
    assert texts[0].body == "hello from Kalandra"
    assert texts[0].decrypted  # encrypted up to the bridge, and readable


@pytest.mark.asyncio
async def test_make_run_system_is_usable_survives_the_bridge_and_is_reused(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    hs_port = free_port()
    ports = [
        f"--synapse-port={hs_port}",
        f"--appservice-port={free_port()}",
        f"--tcp-port={free_port()}",
        f"--quic-port={free_port()}",
    ]
    stack = Devstack(data, ports)
    try:
        mark = await stack.until("Stop everything with Ctrl-C")
        printed = stack.out
        assert RUNNING in printed
        password = re.search(r"user @admin:localhost  password (\S+)", printed)
        assert password, printed
        creds = json.loads((data / "credentials.json").read_text())
        assert creds["matrix_password"] == password.group(1)
        assert oct((data / "credentials.txt").stat().st_mode & 0o777) == "0o600"
        restart = re.search(r"Restart the bridge alone \(Synapse keeps running\): (.+)", printed)
        assert restart, printed

        # The native side: the printed login line, as printed.
        login = next(line for line in printed.splitlines() if " login --server " in line)
        argv = shlex.split(login.split("#", 1)[0])
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(creds["alice"]["member_id"]) in done.stdout

        # The Matrix side: the printed account logs in (an E2EE client, as Element) and the
        # bot answers, naming the member id printed.
        bot = re.search(r"The bridge's Kalandra member id is (\d+) ", printed)
        assert bot, printed
        assert "New portals are end-to-end encrypted up to the bridge." in printed
        config = AsyncClientConfig(encryption_enabled=True, store=SqliteMemoryStore)
        client = AsyncClient(f"http://127.0.0.1:{hs_port}", "@admin:localhost", config=config)
        try:
            assert isinstance(await client.login(password.group(1)), LoginResponse)
            await client.keys_upload()
            await client.sync(timeout=0)
            dm = await open_dm(client)
            notices = bot_notices(client, dm)
            await sync_until(client, lambda: len(notices) >= 1, "welcome", within=30)
            await _ping(client, dm, notices)
            assert "`admin`" in notices[1]
            assert f"member id is `{bot.group(1)}`" in notices[1]
            assert await _bot_cross_signed(client)
            assert oct((data / "bot-recovery-key.txt").stat().st_mode & 0o777) == "0o600"
            alice_ghost = f"@kalandra_{creds['alice']['member_id']}:localhost"
            await _first_conversation(printed, client, alice_ghost)
            synapse = _synapse_pids(data)
            assert len(synapse) == 1

            # The bridge crashes: Synapse stays, the devstack says so and starts it again.
            crashed = stack.bridge_pid()
            os.kill(crashed, signal.SIGKILL)
            mark = await stack.until("the bridge was killed by SIGKILL;", after=mark)
            mark = await stack.until("Synapse keeps running", after=mark)
            mark = await stack.until("starting the bridge again in", after=mark)
            mark = await stack.until(f"`{restart.group(1)}` restarts the bridge alone", after=mark)
            mark = await stack.until("the bridge is running again", after=mark)
            await _ping(client, dm, notices)

            # The printed command restarts the bridge alone.
            stopped = stack.bridge_pid()
            assert stopped != crashed
            done = await asyncio.to_thread(
                subprocess.run, ["sh", "-c", restart.group(1)], timeout=60, check=False
            )
            assert done.returncode == 0
            mark = await stack.until("Synapse keeps running", after=mark)
            mark = await stack.until("the bridge is running again", after=mark)
            assert stack.bridge_pid() != stopped
            await _ping(client, dm, notices)
            assert _synapse_pids(data) == synapse  # the same Synapse all along
        finally:
            # (nio retries forever while Synapse is unreachable: only if a step above failed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.logout(), 30)
            await client.close()
        last_bridge = stack.bridge_pid()
        await stack.stop("ctrl-c")
        assert "Synapse stopped" not in stack.out
        assert not _alive(last_bridge)
        assert _synapse_pids(data) == []
        assert not (data / "bridge.pid").exists()
    finally:
        if stack.proc.poll() is None:
            os.killpg(stack.proc.pid, signal.SIGKILL)

    # The second run reuses the accounts (same password, same native members); SIGTERM stops.
    stack = Devstack(data, ports)
    try:
        await stack.until("Stop everything with Ctrl-C")
        assert f"password {password.group(1)}" in stack.out
        # alice logged in with the printed line: not printed again, her state file keeps it.
        assert f"alice: member {creds['alice']['member_id']}, logged in" in stack.out
        assert f"# member {creds['bob']['member_id']}" in stack.out
        await stack.stop("sigterm")
        assert _synapse_pids(data) == []
    finally:
        if stack.proc.poll() is None:
            os.killpg(stack.proc.pid, signal.SIGKILL)
