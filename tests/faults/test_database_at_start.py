"""A database that is not up yet when a service starts is waited for; one that refuses fails fast.

* The bridge (`python -m bridge`) started while its PostgreSQL server (the test's own) is
  stopped logs "waiting for the database" (one line per attempt, its password masked, no
  traceback) and keeps running; a SIGTERM meanwhile is a clean stop (status 0). Once PostgreSQL
  is started it becomes ready by itself and bridges both ways.
* A database that answers but refuses (here: no such database) is a configuration error: the
  bridge and `kalandra serve` exit at once, non-zero, with the reason and no traceback.
* `kalandra serve` waits the same way for a database server that is not there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults.private_postgres import PrivatePostgres
from matrix.bridge_stack import (
    PG_ADMIN_DSN,
    REPO,
    BridgeStack,
    bridge_stack,
    native_client,
    nio_client,
    portal_with_native,
    run_bridge,
    say,
    wait_history,
    write_config,
)
from matrix.synapse import free_port
from ruamel.yaml import YAML

from kalandra_core.client.events import Message

SECRET = "s3cret-in-the-dsn"  # trust auth accepts it; it must never reach the log
WAITING = "waiting for the database"
WITHIN = 60.0  # seconds, a failsafe for what a loaded machine does in a few


def with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{SECRET}@{host}"


def set_database_url(config: Path, url: str) -> None:
    yaml = YAML()
    data = yaml.load(config.read_text(encoding="utf-8"))
    data["database"]["url"] = url
    with open(config, "w", encoding="utf-8") as fh:
        yaml.dump(data, fh)


def text_of(log: Path) -> str:
    return log.read_text(errors="replace")


def check(text: str, has: tuple[str, ...] = (), lacks: tuple[str, ...] = ()) -> None:
    for part in has:
        assert part in text, text[-4000:]
    for part in lacks:
        assert part not in text, text[-4000:]


async def log_count(log: Path, text: str, at_least: int, process: subprocess.Popen[bytes]) -> None:
    """Until ``text`` is in ``log`` ``at_least`` times, while ``process`` keeps running."""
    async with asyncio.timeout(WITHIN):
        while text_of(log).count(text) < at_least:
            assert process.poll() is None, text_of(log)[-4000:]
            await asyncio.sleep(0.2)


async def exit_status(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(process.wait, WITHIN)


async def both_ways(stack: BridgeStack) -> None:
    native = await native_client(stack)
    try:
        async with nio_client(stack.synapse, stack.user) as alice:
            _, portal = await portal_with_native(alice, native, "after the outage")
            await say(alice, portal, "from matrix")
            async with asyncio.timeout(WITHIN):
                while True:
                    message: Message = await native.messages.get()
                    if message.sender_id != native.core.member_id:
                        break
            assert message.content.body == "from matrix"
            await native.send_text(message.room_id, "from kalandra")
            ghost = f"@kalandra_{native.core.member_id}:localhost"
            seen = await wait_history(alice, portal, ghost, 1)
            assert [body for _, body in seen] == ["from kalandra"]
    finally:
        await native.close()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_bridge_waits_for_postgres_down_at_its_start(
    tmp_path: Path, postgres: PrivatePostgres
) -> None:
    async with bridge_stack(
        tmp_path, "postgres", start=False, pg_admin=postgres.admin_dsn
    ) as stack:
        set_database_url(stack.config, with_password(stack.database_url))
        try:
            await asyncio.to_thread(postgres.stop)
            stack.start_bridge()
            assert stack.bridge is not None
            await log_count(stack.log, WAITING, 1, stack.bridge)
            stack.bridge.send_signal(signal.SIGTERM)  # a stop while waiting: a clean one
            assert await exit_status(stack.bridge) == 0

            stack.start_bridge()
            before = text_of(stack.log).count(WAITING)
            await log_count(stack.log, WAITING, before + 2, stack.bridge)  # attempts go on
        finally:
            if not postgres.running():
                await asyncio.to_thread(postgres.start)
        await stack.wait_ready()  # by itself, once PostgreSQL answers
        check(text_of(stack.log), has=("attempt 2",), lacks=("Traceback", SECRET))
        await both_ways(stack)


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_database_that_refuses_fails_fast(tmp_path: Path) -> None:
    """No such database: the bridge and `kalandra serve` exit with the reason, no retry."""
    missing = with_password(f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/kalandra_no_such_database")
    config, log = tmp_path / "config.yaml", tmp_path / "bridge.log"
    write_config(
        config,
        hs_port=free_port(),
        as_port=free_port(),
        database_url=missing,
        permissions={"*": "relay"},
    )
    generate = run_bridge("-g", "-c", str(config), "-r", str(tmp_path / "reg.yaml"), cwd=tmp_path)
    assert await exit_status(generate) == 0
    bridge = run_bridge("-c", str(config), cwd=tmp_path, log=log)
    assert await exit_status(bridge) == 25
    check(
        text_of(log),
        has=("Cannot use the database", "does not exist"),
        lacks=(WAITING, "Traceback", SECRET),
    )

    serve = serve_process(config, tmp_path / "serve.log")
    assert await exit_status(serve) == 2
    check(text_of(tmp_path / "serve.log"), has=("does not exist",), lacks=("Traceback", SECRET))


def serve_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kalandra_core", "serve", "-c", str(config)],
            cwd=config.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.asyncio
async def test_kalandra_serve_waits_for_its_database_and_stops_cleanly(tmp_path: Path) -> None:
    """A PostgreSQL address where nothing listens (as when the server is down): serve waits,
    one line per attempt, and SIGTERM meanwhile exits 0."""
    config, log = tmp_path / "config.yaml", tmp_path / "serve.log"
    write_config(
        config,
        hs_port=free_port(),
        as_port=free_port(),
        database_url=f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/kalandra",
        permissions={"*": "relay"},
    )
    serve = serve_process(config, log)
    await log_count(log, WAITING, 2, serve)
    serve.send_signal(signal.SIGTERM)
    assert await exit_status(serve) == 0
    check(text_of(log), has=("attempt 2",), lacks=("Traceback", SECRET))
