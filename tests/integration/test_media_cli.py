"""``kalandra send-file`` and ``kalandra download`` as a user runs them (real subprocesses)
against a real server over TCP: the file arrives byte for byte in another member's client."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from kalandra_core.server.app import RunningServer


async def kalandra(state: Path, *args: str, ok: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kalandra_core",
        *args[:1],
        "--state",
        str(state),
        *args[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert (proc.returncode == 0) == ok, (args, out, err)
    return (out if ok else err).decode()


async def test_send_file_and_download(server: RunningServer, tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{server.tcp_port}"
    states = {}
    for name in ("alice", "bob"):
        member = await server.store.create_member(name)
        token = await server.store.issue_token(member.member_id)
        states[name] = (tmp_path / f"{name}.db", member.member_id)
        await kalandra(states[name][0], "login", "--server", url, "--token", token)
    alice, bob = states["alice"][0], states["bob"][0]
    room = (await kalandra(alice, "create-room", "--name", "files")).strip()
    await kalandra(alice, "invite", room, str(states["bob"][1]))
    assert room in await kalandra(bob, "join")

    original = tmp_path / "photo.jpg"
    original.write_bytes(os.urandom(600 * 1024))
    sent = await kalandra(alice, "send-file", room, str(original))
    assert "image" in sent
    assert f"{600 * 1024} bytes" in sent
    index = sent.rsplit("log index ", 1)[1].strip()
    history = await kalandra(bob, "history", room)
    assert f"#{index} " in history
    assert "[image] photo.jpg" in history
    target = tmp_path / "copy.jpg"
    saved = await kalandra(bob, "download", room, index, str(target))
    assert "image/jpeg" in saved
    assert target.read_bytes() == original.read_bytes()
    # A message without a file: one clear line, nothing written.
    text = await kalandra(alice, "send", room, "hello")
    plain_index = text.rsplit("log index ", 1)[1].strip()
    await kalandra(bob, "history", room)
    missing = tmp_path / "nothing"
    error = await kalandra(bob, "download", room, plain_index, str(missing), ok=False)
    assert f"no file at log index {plain_index}" in error
    assert not missing.exists()
