"""`make run`'s system (python -m bridge.devstack) as a newcomer uses it: it prints how to log in,
the Matrix admin it made can talk to the bot, the native account's printed `kalandra login` line
works against the embedded server, Ctrl-C stops everything cleanly, and a second run reuses the
accounts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nio import AsyncClient, LoginResponse

from matrix.bridge_stack import REPO, bot_notices, open_dm, say, sync_until
from matrix.synapse import free_port

RUNNING = "Kalandra Bridge is running"


def _spawn(data: Path, ports: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge.devstack", "--data", str(data), *ports],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def _start(data: Path, ports: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = _spawn(data, ports)
    assert proc.stdout is not None
    out = b""
    async with asyncio.timeout(120):
        while b"Stop everything with Ctrl-C" not in out:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, f"devstack exited early:\n{out.decode(errors='replace')}"
            out += line
    return proc, out.decode()


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0


@pytest.mark.asyncio
async def test_make_run_system_is_usable_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    hs_port = free_port()
    ports = [
        f"--synapse-port={hs_port}",
        f"--appservice-port={free_port()}",
        f"--tcp-port={free_port()}",
        f"--quic-port={free_port()}",
    ]
    proc, printed = await _start(data, ports)
    try:
        assert RUNNING in printed
        password = re.search(r"user @admin:localhost  password (\S+)", printed)
        assert password, printed
        creds = json.loads((data / "credentials.json").read_text())
        assert creds["matrix_password"] == password.group(1)
        assert oct((data / "credentials.txt").stat().st_mode & 0o777) == "0o600"

        # The Matrix side: the printed account logs in and the bot answers.
        client = AsyncClient(f"http://127.0.0.1:{hs_port}", "@admin:localhost")
        try:
            assert isinstance(await client.login(password.group(1)), LoginResponse)
            await client.sync(timeout=0)
            dm = await open_dm(client)
            notices = bot_notices(client, dm)
            await sync_until(client, lambda: len(notices) >= 1, "welcome", within=30)
            await say(client, dm, "ping")
            await sync_until(client, lambda: len(notices) >= 2, "pong", within=30)
            assert notices[1].startswith("Pong: the Kalandra server is up")
            assert "`admin`" in notices[1]
        finally:
            await client.logout()
            await client.close()

        # The native side: the printed login line, as printed.
        login = next(line for line in printed.splitlines() if " login --server " in line)
        argv = shlex.split(login.split("#", 1)[0])
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(creds["alice"]["member_id"]) in done.stdout
    finally:
        await _stop(proc)

    # The second run reuses the accounts (same password, same native members).
    proc, again = await _start(data, ports)
    try:
        assert f"password {password.group(1)}" in again
        assert f"# member {creds['alice']['member_id']}" in again
    finally:
        await _stop(proc)
