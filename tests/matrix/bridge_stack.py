"""The bridge against a real Synapse, for tests: `python -m bridge` as a process (restartable,
killable), its own Synapse registered with what `python -m bridge -g` wrote, the bridge's one
database on SQLite (a file in the work dir) or PostgreSQL (a fresh database, dropped after),
nio clients as Matrix users and `kalandra_core` clients as native members.

Test modules make a module-scoped ``stack`` fixture with :func:`bridge_stack`; the helpers below
(sending, waiting on history, the bot's notices) are shared by all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers.matrix import PASSWORD as PASSWORD
from helpers.matrix import nio_client as nio_client
from helpers.matrix import say as say
from helpers.matrix import sync_until as sync_until
from nacl.signing import SigningKey
from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    RoomCreateResponse,
    RoomMessageNotice,
    RoomMessagesResponse,
    RoomMessageText,
)
from ruamel.yaml import YAML

from bridge.devstack.ready import wait_bridge_ready
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.events import Message
from kalandra_core.client.extras import ExtendedCore
from kalandra_core.storage.sql import SqlStore
from matrix.synapse import SYNAPSE_PYTHON, Synapse, free_port, start_synapse

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example-config.yaml"
BOT = "@kalandrabot:localhost"
READY_TIMEOUT = 60.0
PG_ADMIN_DSN = os.environ.get("KALANDRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASES = ("sqlite", "postgres")


def write_config(
    path: Path,
    *,
    hs_port: int,
    as_port: int,
    database_url: str,
    permissions: dict[str, str],
    bridge_options: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    yaml = YAML()
    with open(EXAMPLE, encoding="utf-8") as fh:
        config = yaml.load(fh)
    config["database"]["url"] = database_url
    config["server"]["tcp_port"] = free_port()
    config["server"]["quic_port"] = None
    config["homeserver"]["address"] = f"http://127.0.0.1:{hs_port}"
    config["homeserver"]["domain"] = "localhost"
    config["appservice"]["address"] = f"http://127.0.0.1:{as_port}"
    config["appservice"]["port"] = as_port
    # The bot's device for end-to-bridge encryption is not what these tests are about.
    config["bridge"]["encryption"]["allow"] = False
    config["bridge"]["permissions"] = permissions
    for key, value in [
        *((f"bridge.{k}", v) for k, v in (bridge_options or {}).items()),
        *(options or {}).items(),
    ]:
        target = config
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)
    return dict(config)


def run_bridge(*args: str, cwd: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def wait_ready(bridge: subprocess.Popen[bytes], port: int, log: Path) -> None:
    try:
        if await wait_bridge_ready(bridge, port, READY_TIMEOUT):
            return
    except TimeoutError:
        raise AssertionError(f"bridge not ready in {READY_TIMEOUT} s:\n{tail(log)}") from None
    raise AssertionError(f"bridge exited with {bridge.returncode}:\n{tail(log)}")


def _append(log: Path, text: str) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(text)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@asynccontextmanager
async def fresh_postgres(admin_dsn: str = PG_ADMIN_DSN) -> AsyncIterator[str]:
    """A brand-new PostgreSQL database (its URL) on the server of ``admin_dsn``, dropped
    afterwards."""
    name = f"kalandra_bridge_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class BridgeStack:
    synapse: Synapse
    work: Path
    config: Path
    log: Path
    as_port: int
    tcp_port: int
    database_url: str  # as the bridge's config has it
    user: str  # localpart with the `admin` permission
    others: dict[str, str]  # more localparts by role name ("user", "relay", "stranger")
    bridge: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def store_url(self) -> str:
        """The same database, as a test process opens it (absolute SQLite path)."""
        if self.database_url.startswith("sqlite:///"):
            return f"sqlite:///{self.work / self.database_url.removeprefix('sqlite:///')}"
        return self.database_url

    def start_bridge(self) -> None:
        self.bridge = run_bridge("-c", str(self.config), cwd=self.work, log=self.log)

    async def wait_ready(self) -> None:
        assert self.bridge is not None
        await wait_ready(self.bridge, self.as_port, self.log)

    async def restart(self) -> None:
        self.start_bridge()
        await self.wait_ready()

    async def kill9(self) -> None:
        assert self.bridge is not None
        self.bridge.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.bridge.wait, 15)

    async def kill9_synapse(self, down: float = 0.0, gone: asyncio.Event | None = None) -> None:
        """SIGKILL Synapse (it forgets its unsent appservice queue and the appservice's
        transaction ids), leave it down ``down`` seconds (``gone`` set meanwhile), start it again
        on the same port and data."""
        process = self.synapse.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 15)
        if gone is not None:
            gone.set()
        await asyncio.sleep(down)
        await self.synapse.restart()

    async def task_dump(self) -> str:
        """The bridge's log after it wrote what each of its tasks waits on (SIGUSR1)."""
        if self.bridge is None or self.bridge.poll() is not None:
            return tail(self.log)
        self.bridge.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0)
        return self.log.read_text(errors="replace")[-30000:]

    async def stop_bridge(self) -> None:
        if self.bridge is None or self.bridge.poll() is not None:
            return
        self.bridge.terminate()
        try:
            await asyncio.to_thread(self.bridge.wait, 15)
        except subprocess.TimeoutExpired:
            # A stop that hangs is a defect of its own: said in the log, which tests show, with
            # what each of the bridge's tasks waits on (SIGUSR1).
            self.bridge.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1)
            note = "TEST HARNESS: SIGTERM did not stop the bridge in 15 s: killed\n"
            await asyncio.to_thread(_append, self.log, note)
            self.bridge.kill()
            await asyncio.to_thread(self.bridge.wait, 15)


@asynccontextmanager
async def bridge_stack(
    work: Path,
    database: str = "sqlite",
    *,
    others: tuple[str, ...] = (),
    bridge_options: dict[str, Any] | None = None,
    default_level: str = "relay",
    options: dict[str, Any] | None = None,
    start: bool = True,
    pg_admin: str = PG_ADMIN_DSN,
) -> AsyncIterator[BridgeStack]:
    """Synapse + the bridge process. ``stack.user`` (a registered localpart) is a bridge admin;
    each role in ``others`` gets a registered localpart (``stack.others[role]``): "relay",
    "user" and "admin" with that permission level, any other name ("stranger") with the
    default, ``default_level``. ``bridge_options`` set options under ``bridge.``, ``options``
    any option by its full dotted path ("metrics.enabled"). ``start=False``: the bridge is not
    started (``stack.restart()`` does), so a test can prepare its database first. ``pg_admin``:
    the PostgreSQL server to make the database on (a test's own, to stop it)."""
    if not SYNAPSE_PYTHON.exists():
        pytest.fail(f"{SYNAPSE_PYTHON} is missing: run tests/matrix/install_synapse.sh")
    async with contextlib.AsyncExitStack() as exits:
        if database == "postgres":
            database_url = await exits.enter_async_context(fresh_postgres(pg_admin))
        else:
            database_url = "sqlite:///kalandra.db"
        hs_port, as_port = free_port(), free_port()
        user = f"alice_{secrets.token_hex(3)}"
        named = {role: f"{role}_{secrets.token_hex(3)}" for role in others}
        permissions = {"*": default_level, f"@{user}:localhost": "admin"}
        for role, localpart in named.items():
            if role in ("relay", "user", "admin"):
                permissions[f"@{localpart}:localhost"] = role
        config, registration = work / "config.yaml", work / "registration.yaml"
        data = write_config(
            config,
            hs_port=hs_port,
            as_port=as_port,
            database_url=database_url,
            permissions=permissions,
            bridge_options=bridge_options,
            options=options,
        )
        generate = run_bridge("-g", "-c", str(config), "-r", str(registration), cwd=work)
        out, _ = await asyncio.to_thread(generate.communicate, None, 60)
        assert generate.returncode == 0, out.decode(errors="replace")
        synapse = await start_synapse(work / "synapse", registrations=[registration], port=hs_port)
        exits.push_async_callback(synapse.stop)
        stack = BridgeStack(
            synapse,
            work,
            config,
            work / "bridge.log",
            as_port,
            int(data["server"]["tcp_port"]),
            database_url,
            user,
            named,
        )
        exits.push_async_callback(stack.stop_bridge)
        if start:
            await stack.restart()
        for localpart in (user, *named.values()):
            await synapse.register_user(localpart, PASSWORD)
        yield stack
    assert "Traceback" not in tail(stack.log), tail(stack.log)


# --- Matrix users -------------------------------------------------------------------------------


def bot_notices(client: AsyncClient, room_id: str) -> list[str]:
    """Bodies of the notices the bot sends in `room_id` from now on (nio keeps callbacks for
    the client's lifetime: one client per test)."""
    seen: list[str] = []

    async def on_notice(room: MatrixRoom, event: RoomMessageNotice) -> None:
        if room.room_id == room_id and event.sender == BOT:
            seen.append(event.body)

    client.add_event_callback(on_notice, RoomMessageNotice)
    return seen


async def open_dm(client: AsyncClient) -> str:
    created = await client.room_create(invite=[BOT], is_direct=True)
    assert isinstance(created, RoomCreateResponse), created
    return str(created.room_id)


async def encrypted_dm(client: AsyncClient) -> str:
    """A new end-to-end encrypted DM with the bot (its room id)."""
    created = await client.room_create(
        invite=[BOT],
        is_direct=True,
        initial_state=[
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ],
    )
    assert isinstance(created, RoomCreateResponse), created
    return str(created.room_id)


async def room_history(client: AsyncClient, room_id: str) -> list[Any]:
    """Every event of the room's timeline, oldest first (a sync's timeline is cut to its last
    events after a burst, so callbacks alone would miss some)."""
    await client.sync(timeout=0)
    return await timeline(client, room_id)


async def timeline(client: AsyncClient, room_id: str) -> list[Any]:
    """The room's timeline, oldest first, back from the client's last sync position (for a
    client whose syncs run elsewhere)."""
    token, events = client.next_batch, []
    while True:
        page = await client.room_messages(room_id, start=token, limit=100)
        assert isinstance(page, RoomMessagesResponse), page
        events += page.chunk
        if not page.chunk or page.end is None:
            break
        token = page.end
    return list(reversed(events))


async def ghost_texts(client: AsyncClient, room_id: str, ghost: str) -> list[RoomMessageText]:
    """The ghost's text messages in the room, oldest first."""
    return [
        event
        for event in await room_history(client, room_id)
        if isinstance(event, RoomMessageText) and event.sender == ghost
    ]


async def ghost_history(client: AsyncClient, room_id: str, ghost: str) -> list[tuple[str, str]]:
    """(event id, body) of the ghost's text messages in the room, oldest first."""
    return [(event.event_id, event.body) for event in await ghost_texts(client, room_id, ghost)]


async def wait_history(
    client: AsyncClient, room_id: str, ghost: str, count: int, within: float = 60.0
) -> list[tuple[str, str]]:
    async with asyncio.timeout(within):
        while len(seen := await ghost_history(client, room_id, ghost)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return seen


# --- native members ---------------------------------------------------------------------------


async def native_client(
    stack: BridgeStack, key_packages: int = 2, *, extended: bool = False
) -> Client:
    """A new native member (account made in the bridge's database), connected over TCP;
    ``extended``: its client also reports reactions, receipts, typing and moderation."""
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.create_member(f"native_{secrets.token_hex(3)}")
        token = await store.issue_token(account.member_id)
    finally:
        await store.close()
    make = ExtendedCore if extended else ClientCore
    core = make(account.member_id, bytes(SigningKey.generate()))
    client = Client(core, ServerAddress("tcp", "127.0.0.1", stack.tcp_port), token)
    await client.connect()
    await client.publish_key_packages(key_packages)
    return client


async def messages_from_others(
    native: Client, into: list[Message], count: int, room: bytes | None = None
) -> None:
    """Collect into ``into`` the messages ``native`` receives from other members (of ``room``
    when given) until there are ``count``; its own echoes are skipped."""
    while len(into) < count:
        message = await native.messages.get()
        if message.sender_id != native.core.member_id and room in (None, message.room_id):
            into.append(message)


def ghost_of(client: Client) -> str:
    return f"@kalandra_{client.core.member_id}:localhost"


async def create_portal(alice: AsyncClient, name: str) -> tuple[str, str]:
    """Through the bot's DM: create a portal named ``name`` and join it as ``alice``.
    Returns (room hex, portal room id)."""
    await alice.sync(timeout=0)
    dm = await open_dm(alice)
    notices = bot_notices(alice, dm)
    await sync_until(alice, lambda: len(notices) >= 1, "welcome from the bot")
    invites: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == alice.user_id and event.membership == "invite":
            invites.append(room.room_id)

    alice.add_event_callback(on_invite, InviteMemberEvent)
    await say(alice, dm, f"!kalandra create {name}")
    await sync_until(alice, lambda: len(notices) >= 2 and bool(invites), "the portal")
    match = re.search(r"Created Kalandra room `([0-9a-f]{32})`", notices[1])
    assert match, notices[1]
    portal = invites[0]
    await alice.join(portal)
    await sync_until(alice, lambda: portal in alice.rooms, "the join")
    return match.group(1), portal


async def command(alice: AsyncClient, room_id: str, text: str, within: float = 15.0) -> str:
    """Send a bot command in ``room_id`` and return the bot's next notice there."""
    await alice.sync(timeout=0)  # notices sent before the command are not its answer
    notices = bot_notices(alice, room_id)
    await say(alice, room_id, text)
    await sync_until(alice, lambda: bool(notices), f"an answer to {text!r}", within)
    return notices[0]


async def portal_with_native(alice: AsyncClient, native: Client, name: str) -> tuple[str, str]:
    """A new portal with ``alice`` joined and the native member added by the bot (admin
    command). Returns (room hex, portal room id)."""
    room_hex, portal = await create_portal(alice, name)
    answer = await command(alice, portal, f"!kalandra invite {room_hex} {native.core.member_id}")
    assert answer.startswith("Added member"), answer
    assert await asyncio.wait_for(native.joined.get(), 15) == bytes.fromhex(room_hex)
    await native.settle()
    # Its ghost is in the portal before anyone speaks there: the portal's history visibility
    # (`invited`) hides from a ghost what came before its join (e.g. for its read receipts).
    async with asyncio.timeout(60):
        while True:
            state = await alice.room_get_state_event(portal, "m.room.member", ghost_of(native))
            if getattr(state, "content", {}).get("membership") == "join":
                break
            await asyncio.sleep(0.2)
    return room_hex, portal
