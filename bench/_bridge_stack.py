"""Helpers for the bridge benchmark: a throwaway Synapse + the bridge process, Matrix users.

:func:`bridge_bench_stack` starts a Synapse from ``.venv-synapse/`` (bridge/devstack/synapse.py,
the same one the Matrix tests and ``make run`` use) and ``python -m bridge`` on a fresh SQLite
database in a temporary directory, both registered with each other, and always stops both and
removes the directory. If Synapse is not installed it raises :class:`SynapseMissing` before
starting anything. :class:`MatrixUser` is a minimal client-server API client on one aiohttp
session (the bridge's own HTTP stack), enough to drive the bot and to time arrivals by /sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from bridge.config import EXAMPLE_CONFIG
from bridge.devstack.ready import wait_bridge_ready
from bridge.devstack.synapse import SERVER_NAME, SYNAPSE_PYTHON, Synapse, free_port, start_synapse
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.storage.sql import SqlStore

from .common import Results

REPO = Path(__file__).resolve().parents[1]
BOT = f"@kalandrabot:{SERVER_NAME}"
PASSWORD = "bench password, not secret"
READY_TIMEOUT = 90.0
_STOP_GRACE = 20.0


class SynapseMissing(RuntimeError):
    """``.venv-synapse`` is not there: the benchmark cannot run (and says so)."""


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    room_id: str
    sender: str
    type: str
    content: dict[str, Any]
    arrived: float  # time.time() when the /sync response carrying it was read


class MatrixUser:
    """One logged-in Matrix user: raw client-server API calls on one keep-alive session."""

    def __init__(self, base_url: str, localpart: str, as_token: str = "") -> None:
        self.base_url = base_url
        self.user_id = f"@{localpart}:{SERVER_NAME}"
        self.localpart = localpart
        self.token = as_token
        # With the appservice's token: every request is made as this user of its namespace.
        self.masquerade = bool(as_token)
        self.since: str | None = None
        self.invites: set[str] = set()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._txn = 0
        # Every timeline event of a sync: no per-room cut (Synapse's default limit is 10).
        self._filter = json.dumps({"room": {"timeline": {"limit": 5000}}, "presence": {}})

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.masquerade:
            params = {**(params or {}), "user_id": self.user_id}
        async with self._http.request(
            method,
            f"{self.base_url}/_matrix/client/v3{path}",
            json=body,
            params=params,
            headers=headers,
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"{method} {path.split('?')[0]}: HTTP {resp.status}: {data}")
            return dict(data)

    async def login(self) -> None:
        data = await self.request(
            "POST",
            "/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self.localpart},
                "password": PASSWORD,
            },
        )
        self.token = data["access_token"]

    async def close(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
            if self.token and not self.masquerade:
                await self.request("POST", "/logout", {})
        await self._http.close()

    async def create_room(self, *, invite: list[str] | None = None, direct: bool = False) -> str:
        body: dict[str, Any] = {"preset": "private_chat", "invite": invite or []}
        if direct:
            body["is_direct"] = True
        return str((await self.request("POST", "/createRoom", body))["room_id"])

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/join/{quote(room_id, safe='')}", {})

    async def send(self, room_id: str, body: str, html: str | None = None) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if html is not None:
            content |= {"format": "org.matrix.custom.html", "formatted_body": html}
        self._txn += 1
        txn = f"bench-{os.getpid()}-{time.monotonic_ns()}-{self._txn}"
        path = f"/rooms/{quote(room_id, safe='')}/send/m.room.message/{txn}"
        return str((await self.request("PUT", path, content))["event_id"])

    async def upload(self, data: bytes, mimetype: str) -> str:
        """Into the media repository; the mxc URI."""
        headers = {"Content-Type": mimetype}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        params = {"user_id": self.user_id} if self.masquerade else None
        async with self._http.post(
            f"{self.base_url}/_matrix/media/v3/upload", data=data, params=params, headers=headers
        ) as resp:
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"upload: HTTP {resp.status}: {answer}")
            return str(answer["content_uri"])

    async def download(self, mxc: str) -> bytes:
        """Authenticated media (client v1)."""
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        async with self._http.get(
            f"{self.base_url}/_matrix/client/v1/media/download/{server}/{media_id}",
            headers={"Authorization": f"Bearer {self.token}"},
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"download: HTTP {resp.status}")
            return await resp.read()

    async def sync(self, timeout_ms: int) -> list[TimelineEvent]:
        params = {"timeout": str(timeout_ms), "filter": self._filter}
        if self.since is not None:
            params["since"] = self.since
        data = await self.request("GET", "/sync", params=params)
        arrived = time.time()
        self.since = data["next_batch"]
        rooms = data.get("rooms", {})
        self.invites |= set(rooms.get("invite", {}))
        return [
            TimelineEvent(room_id, e["sender"], e["type"], e.get("content", {}), arrived)
            for room_id, room in rooms.get("join", {}).items()
            for e in room.get("timeline", {}).get("events", [])
        ]

    async def sync_until(
        self, done: Callable[[list[TimelineEvent]], bool], what: str, within: float = 60.0
    ) -> None:
        """Sync until ``done`` (fed each batch) says so."""
        try:
            async with asyncio.timeout(within):
                while not done(await self.sync(1_000)):
                    pass
        except TimeoutError:
            raise RuntimeError(f"{self.user_id}: no {what} within {within:g} s") from None


async def bot_command(user: MatrixUser, room_id: str, text: str, within: float = 60.0) -> str:
    """Send a bot command in ``room_id`` and return the bot's next notice there."""
    await user.sync(0)  # only answers after this point count
    await user.send(room_id, text)
    answers: list[str] = []

    def answered(events: list[TimelineEvent]) -> bool:
        answers.extend(
            str(e.content.get("body", ""))
            for e in events
            if e.room_id == room_id and e.sender == BOT and e.content.get("msgtype") == "m.notice"
        )
        return bool(answers)

    await user.sync_until(answered, f"answer to {text.split()[1]!r}", within)
    return answers[0]


@dataclass
class BridgeBenchStack:
    work: Path
    synapse: Synapse
    tcp_port: int
    as_port: int
    database_url: str  # absolute: as this process opens it
    metrics_port: int  # the bridge's Prometheus listener
    provisioning_secret: str  # the provisioning API's shared secret
    bridge: subprocess.Popen[bytes] | None = None
    users: list[MatrixUser] = field(default_factory=list)
    natives: list[Client] = field(default_factory=list)
    portal: str = ""  # the Matrix room of the portal made by portal_with_native
    dm: str = ""  # the admin's direct chat with the bot, made by portal_with_native

    @property
    def log(self) -> Path:
        return self.work / "bridge.log"

    def bridge_alive(self) -> bool:
        return self.bridge is not None and self.bridge.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The bridge process's metrics now: (sample name, sorted labels) -> value. They start
        from zero with each start of the bridge."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def tracebacks(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Traceback")
        except OSError:
            return 0

    async def restart_bridge(self, settings: dict[str, Any]) -> float:
        """Stop the bridge (SIGTERM), set ``settings`` (dotted paths, e.g.
        ``bridge.encryption.ghost_devices``) in its config, start it again and wait until it is
        ready; the seconds that took. Native clients reconnect by themselves."""
        started = time.perf_counter()
        await _stop_bridge(self)
        _set_config(self.work / "config.yaml", settings)
        await self.start_bridge()
        return time.perf_counter() - started

    async def stop_bridge(self) -> None:
        await _stop_bridge(self)

    async def start_bridge(self) -> float:
        """Start the (stopped) bridge and wait until it is ready; the seconds from the process
        start to ready."""
        started = time.perf_counter()
        self.bridge = _bridge_process(self.work, "-c", "config.yaml", log=self.log)
        await _wait_ready(self)
        return time.perf_counter() - started

    def bridge_rss(self) -> int:
        """The bridge process's resident set size now, bytes."""
        assert self.bridge is not None
        status = Path(f"/proc/{self.bridge.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            raise RuntimeError("no VmRSS for the bridge process")
        return int(match.group(1)) * 1024

    async def provision_room(self, user: MatrixUser, name: str) -> tuple[bytes, str]:
        """A new Kalandra room and its portal through the provisioning API (what an integration
        manager does: no bot command round trips), ``user`` invited to the Matrix room. Returns
        the Kalandra room id and the portal's Matrix room id."""
        config = YAML(typ="safe").load((self.work / "config.yaml").read_text())
        prefix = config["bridge"]["provisioning"]["prefix"]
        url = f"http://127.0.0.1:{self.as_port}{prefix}/v1/rooms"
        headers = {"Authorization": f"Bearer {self.provisioning_secret}"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(
                url, json={"name": name}, params={"user_id": user.user_id}, headers=headers
            ) as resp,
        ):
            data = await resp.json(content_type=None)
            if resp.status != 201:
                raise RuntimeError(f"provisioning create: HTTP {resp.status}: {data}")
        return bytes.fromhex(data["room_id"]), str(data["matrix_room_id"])

    async def add_native(
        self, admin: MatrixUser, portal: str, room: bytes, native: Client, within: float = 60.0
    ) -> None:
        """``admin`` (in ``portal``) has the bot add ``native`` to Kalandra room ``room``;
        returns once the native member has joined."""
        answer = await bot_command(
            admin, portal, f"!kalandra invite {room.hex()} {native.core.member_id}", within
        )
        if not answer.startswith("Added member"):
            raise RuntimeError(f"unexpected answer to invite: {answer!r}")
        if await asyncio.wait_for(native.joined.get(), within) != room:
            raise RuntimeError("the native member joined another room")
        await native.settle()

    async def matrix_user(self, localpart: str) -> MatrixUser:
        """A registered, logged-in Matrix user (logged out when the stack stops)."""
        await self.synapse.register_user(localpart, PASSWORD)
        user = MatrixUser(self.synapse.url, localpart)
        self.users.append(user)
        await user.login()
        return user

    async def appservice_user(self, localpart: str) -> MatrixUser:
        """A user of the bridge's own namespace, driven with its appservice token: what the
        bridge's ghosts are (the bridge ignores it: it is no member of any Kalandra room)."""
        config = YAML(typ="safe").load((self.work / "config.yaml").read_text())
        user = MatrixUser(self.synapse.url, localpart, str(config["appservice"]["as_token"]))
        self.users.append(user)
        with contextlib.suppress(RuntimeError):  # M_USER_IN_USE: registered before
            await user.request(
                "POST",
                "/register",
                {"type": "m.login.application_service", "username": localpart},
            )
        return user

    async def native_client(self) -> Client:
        """A new native member (account made in the bridge's database), connected over TCP."""
        store = await SqlStore.open(self.database_url, migrate=False)
        try:
            account = await store.create_member(f"bench_{secrets.token_hex(3)}")
            token = await store.issue_token(account.member_id)
        finally:
            await store.close()
        core = ClientCore(account.member_id, bytes(SigningKey.generate()))
        client = Client(core, ServerAddress("tcp", "127.0.0.1", self.tcp_port), token)
        self.natives.append(client)
        await client.connect()
        await client.publish_key_packages(2)
        return client

    async def portal_with_native(self, admin: MatrixUser, native: Client, name: str) -> bytes:
        """Through the bot: a new portal joined by ``admin`` (a bridge admin) with ``native``
        added. Returns the Kalandra room id; the portal's Matrix room id is ``self.portal``."""
        dm = self.dm = await admin.create_room(invite=[BOT], direct=True)
        await admin.sync_until(
            lambda events: any(
                e.room_id == dm and e.sender == BOT and e.content.get("msgtype") == "m.notice"
                for e in events
            ),
            "the bot's welcome",
        )
        answer = await bot_command(admin, dm, f"!kalandra create {name}")
        match = re.search(r"Created Kalandra room `([0-9a-f]{32})`", answer)
        if match is None:
            raise RuntimeError(f"unexpected answer to create: {answer!r}")
        await admin.sync_until(lambda _: bool(admin.invites), "the portal's invite")
        portal = admin.invites.pop()
        await admin.join(portal)
        room = bytes.fromhex(match.group(1))
        await self.add_native(admin, portal, room, native)
        self.portal = portal
        return room


def _write_config(
    work: Path,
    hs_port: int,
    as_port: int,
    tcp_port: int,
    admin: str,
    encryption: bool,
    ghost_devices: bool,
    metrics_port: int,
    provisioning_secret: str,
) -> None:
    yaml = YAML()
    with open(EXAMPLE_CONFIG, encoding="utf-8") as fh:
        config = yaml.load(fh)
    config["database"]["url"] = "sqlite:///kalandra.db"
    config["server"]["tcp_port"] = tcp_port
    config["server"]["quic_port"] = None
    # One native client sends a whole burst at once: the per-session rate limit (a guard
    # against abusive clients) is raised out of the way, as in the server benchmark.
    config["server"]["limits"]["rate_per_second"] = 1_000_000
    config["server"]["limits"]["rate_burst"] = 1_000_000
    config["homeserver"]["address"] = f"http://127.0.0.1:{hs_port}"
    config["homeserver"]["domain"] = SERVER_NAME
    config["appservice"]["address"] = f"http://127.0.0.1:{as_port}"
    config["appservice"]["port"] = as_port
    config["metrics"]["enabled"] = True
    config["metrics"]["listen_port"] = metrics_port
    config["bridge"]["provisioning"]["shared_secret"] = provisioning_secret
    # Unencrypted portals unless asked: bridge.py measures bridging, not Megolm; with
    # ``encryption`` a portal is encrypted once a member turns it on (bridge_encrypted.py).
    config["bridge"]["encryption"]["allow"] = encryption
    config["bridge"]["encryption"]["ghost_devices"] = ghost_devices
    config["bridge"]["permissions"] = {"*": "relay", f"@{admin}:{SERVER_NAME}": "admin"}
    with open(work / "config.yaml", "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)


def _set_config(path: Path, settings: dict[str, Any]) -> None:
    yaml = YAML()
    config = yaml.load(path.read_text())
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config, fh)


def _bridge_process(work: Path, *args: str, log: Path | None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", *args],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def _wait_ready(stack: BridgeBenchStack) -> None:
    assert stack.bridge is not None
    if await wait_bridge_ready(stack.bridge, stack.as_port, READY_TIMEOUT):
        return
    raise RuntimeError(f"the bridge exited while starting:\n{stack.log_tail()}")


async def _stop(stack: BridgeBenchStack) -> None:
    for client in stack.natives:
        with contextlib.suppress(Exception):
            await client.close()
    for user in stack.users:
        await user.close()
    await _stop_bridge(stack)
    await stack.synapse.stop()


async def _stop_bridge(stack: BridgeBenchStack) -> None:
    proc = stack.bridge
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, _STOP_GRACE)
        except subprocess.TimeoutExpired:
            # What it is stuck on: a SIGUSR1 makes it log each asyncio task's wait.
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(2)
            print(f"bridge: no exit {_STOP_GRACE:g} s after SIGTERM; killed. Its log:")
            print(stack.log_tail(6000))
            proc.kill()
            await asyncio.to_thread(proc.wait)


@asynccontextmanager
async def bridge_bench_stack(
    admin: str, *, encryption: bool = False, ghost_devices: bool = True
) -> AsyncIterator[BridgeBenchStack]:
    """Synapse + the bridge on SQLite; ``admin`` is the localpart given bridge admin rights;
    ``encryption``: portals may be encrypted (the bot has a device); ``ghost_devices``: each
    ghost encrypts with a device of its own (else the bot's device does)."""
    if not SYNAPSE_PYTHON.exists():
        raise SynapseMissing(f"{SYNAPSE_PYTHON} is missing")
    work = Path(tempfile.mkdtemp(prefix="kalandra-bench-bridge-"))
    try:
        hs_port, as_port, tcp_port, metrics_port = (free_port() for _ in range(4))
        secret = secrets.token_urlsafe(24)
        _write_config(
            work,
            hs_port,
            as_port,
            tcp_port,
            admin,
            encryption,
            ghost_devices,
            metrics_port,
            secret,
        )
        generate = _bridge_process(
            work, "-g", "-c", "config.yaml", "-r", "registration.yaml", log=None
        )
        out, _ = await asyncio.to_thread(generate.communicate, None, 120)
        if generate.returncode != 0:
            raise RuntimeError("writing the registration failed:\n" + out.decode()[-3000:])
        synapse = await start_synapse(
            work / "synapse", registrations=[work / "registration.yaml"], port=hs_port
        )
        stack = BridgeBenchStack(
            work,
            synapse,
            tcp_port,
            as_port,
            f"sqlite:///{work / 'kalandra.db'}",
            metrics_port,
            secret,
        )
        try:
            stack.bridge = _bridge_process(work, "-c", "config.yaml", log=stack.log)
            await _wait_ready(stack)
            yield stack
        finally:
            await _stop(stack)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "BOT",
    "BridgeBenchStack",
    "MatrixUser",
    "SynapseMissing",
    "TimelineEvent",
    "bot_command",
    "bridge_bench_stack",
]


Measure = Callable[["BridgeBenchStack", str, bool], Awaitable[Results]]


def run_on_stack(
    name: str,
    measure: Measure,
    quick: bool,
    *,
    encryption: bool = False,
    ghost_devices: bool = True,
) -> Results:
    """``measure(stack, admin localpart, quick)`` on a fresh stack; without Synapse installed,
    the benchmark says it was skipped and why, and gives no figures."""

    async def main() -> Results:
        admin = f"benchadmin_{secrets.token_hex(3)}"
        stack_of = bridge_bench_stack(admin, encryption=encryption, ghost_devices=ghost_devices)
        try:
            async with stack_of as stack:
                return await measure(stack, admin, quick)
        except SynapseMissing as exc:
            print(
                f"{name}: SKIPPED, Synapse is not installed ({exc}); "
                "`bash bridge/devstack/install_synapse.sh` installs it"
            )
            return Results()

    return asyncio.run(main())
