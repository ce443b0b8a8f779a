"""A throwaway local Synapse: real homeserver, its own virtualenv, SQLite in its work dir.

Used by `make run` (a local trial, bridge/devstack/run.py) and by the tests. `start_synapse()`
writes a homeserver.yaml for localhost (client API only, no federation, rate limits out of the
way), generates the signing key once, starts `synapse.app.homeserver` from `.venv-synapse/`
(installed by `bridge/devstack/install_synapse.sh`) and waits until `GET /_matrix/client/versions`
answers (about 2 s). Users are created with the shared-secret admin registration API, in-process.
The secrets are fixed test values unless the caller passes its own (`make run` keeps generated
ones in its work dir).

The process is a plain `subprocess.Popen` and every HTTP call opens its own aiohttp session, so a
`Synapse` is tied to no event loop: a session-scoped fixture and function-scoped tests share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_VENV = REPO_ROOT / ".venv-synapse"
SYNAPSE_PYTHON = SYNAPSE_VENV / "bin" / "python"
SYNAPSE_VERSION = "1.163.2"

SERVER_NAME = "localhost"
REGISTRATION_SHARED_SECRET = "test_shared_secret"
TEST_SECRETS = {
    "registration_shared_secret": REGISTRATION_SHARED_SECRET,
    "macaroon_secret_key": "test_macaroon_secret",
    "form_secret": "test_form_secret",
}
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Every rate limit of Synapse 1.163 (synapse/config/ratelimiting.py), raised out of the way.
_NO_LIMIT = {"per_second": 1000, "burst_count": 1000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _NO_LIMIT,
    "rc_registration": _NO_LIMIT,
    "rc_registration_token_validity": _NO_LIMIT,
    "rc_login": {"address": _NO_LIMIT, "account": _NO_LIMIT, "failed_attempts": _NO_LIMIT},
    "rc_admin_redaction": _NO_LIMIT,
    "rc_joins": {"local": _NO_LIMIT, "remote": _NO_LIMIT},
    "rc_joins_per_room": _NO_LIMIT,
    "rc_key_requests": _NO_LIMIT,
    "rc_3pid_validation": _NO_LIMIT,
    "rc_invites": {"per_room": _NO_LIMIT, "per_user": _NO_LIMIT, "per_issuer": _NO_LIMIT},
    "rc_third_party_invite": _NO_LIMIT,
    "rc_media_create": _NO_LIMIT,
    "rc_presence": {"per_user": _NO_LIMIT},
    "rc_delayed_event_mgmt": _NO_LIMIT,
    "rc_room_creation": _NO_LIMIT,
    "rc_reports": _NO_LIMIT,
    "rc_user_directory": _NO_LIMIT,
    "rc_profile": _NO_LIMIT,
}

# Synapse logs to stderr, which goes to the log file together with anything printed on a crash.
_LOG_CONFIG = {
    "version": 1,
    "formatters": {"precise": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "precise"}},
    "root": {"level": "INFO", "handlers": ["console"]},
    "disable_existing_loggers": False,
}


class SynapseError(RuntimeError):
    """Synapse would not start, or answered an admin/test call with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, chosen below the kernel's
    ephemeral range: a port the kernel hands out for bind(0) is also what it gives outgoing
    connections, which can take it before the server that was meant to listen on it starts."""
    low, _ = _ephemeral_range()
    first, last = max(1024, low - 12000), low - 1
    # Test runs split over processes (pytest-xdist: PYTEST_XDIST_WORKER "gw0", "gw1", ...)
    # each draw from a share of their own: another process cannot take a port between this
    # one's draw and its server's start.
    worker, workers = _test_worker()
    share = (last - first + 1) // workers
    first += worker * share
    last = first + share - 1
    for _ in range(200):
        port = random.randint(first, last)
        if port in _given:
            continue  # handed out already (its server may not listen yet)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fallback: int = sock.getsockname()[1]
        return fallback


_given: set[int] = set()


def _test_worker() -> tuple[int, int]:
    """This process's number among a test run's processes, and how many there are."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        number = int(name[2:]) if name.startswith("gw") else 0
    except ValueError:
        return 0, 1
    return (number, count) if 0 <= number < count else (0, 1)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _write_json_yaml(path: Path, data: dict[str, Any]) -> None:
    # JSON is YAML: no YAML library needed here, and the file is still readable.
    path.write_text(json.dumps(data, indent=2) + "\n")


def homeserver_config(
    workdir: Path,
    *,
    port: int,
    registrations: Sequence[Path] = (),
    secrets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The homeserver.yaml of a local Synapse, as a dict."""
    data = workdir / "data"
    return {
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(data / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(data / "homeserver.db")}},
        "log_config": str(workdir / "log.config"),
        "media_store_path": str(data / "media_store"),
        "signing_key_path": str(data / f"{SERVER_NAME}.signing.key"),
        "report_stats": False,
        "enable_metrics": False,
        **(secrets or TEST_SECRETS),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "url_preview_enabled": False,
        "presence": {"enabled": False},
        "app_service_config_files": [str(Path(p).resolve()) for p in registrations],
        "experimental_features": {
            # to-device events (room keys) in appservice transactions
            "msc2409_to_device_messages_enabled": True,
            # device lists, one-time-key counts and fallback keys in appservice transactions
            "msc3202_transaction_extensions": True,
        },
        **_RATE_LIMITS,
    }


def write_registration(
    path: Path,
    *,
    url: str,
    as_token: str,
    hs_token: str,
    sender_localpart: str = "kalandrabot",
    user_regex: str,
    alias_regex: str,
    appservice_id: str = "kalandra",
) -> Path:
    """Write an appservice registration file with the MSC flags the bridge relies on.

    For the stack's own tests; the bridge writes its own with `python -m bridge -g`.
    """
    _write_json_yaml(
        path,
        {
            "id": appservice_id,
            "url": url,
            "as_token": as_token,
            "hs_token": hs_token,
            "sender_localpart": sender_localpart,
            "rate_limited": False,
            "namespaces": {
                "users": [{"regex": user_regex, "exclusive": True}],
                "aliases": [{"regex": alias_regex, "exclusive": True}],
                "rooms": [],
            },
            "de.sorunome.msc2409.push_ephemeral": True,
            "receive_ephemeral": True,
            "org.matrix.msc3202": True,
            "io.element.msc4190": True,
        },
    )
    return path


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent (a test process, `make run`) dies, so no
    child outlives a crash."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Synapse:
    """A running throwaway Synapse (see `start_synapse`)."""

    workdir: Path
    port: int
    config_path: Path
    log_path: Path
    server_name: str = SERVER_NAME
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    shared_secret: str = field(default=REGISTRATION_SHARED_SECRET, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mxid(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    # -- process -------------------------------------------------------------------------------

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A Ctrl-C meant for the parent reaches Synapse only as the parent's orderly
                # stop (see supervisor.py), never at the same time as the parent.
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )

    async def launch(self, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self._spawn()
        try:
            async with asyncio.timeout(startup_timeout):
                await self._wait_ready()
        except TimeoutError:
            await self.stop()
            raise SynapseError(
                f"Synapse not ready on {self.url} after {startup_timeout:.0f} s; "
                f"log {self.log_path}:\n" + _tail(self.log_path)
            ) from None
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        """Poll `GET /_matrix/client/versions` every 0.1 s until it answers 200."""
        assert self.process is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise SynapseError(
                        f"Synapse exited with status {code} while starting; log {self.log_path}:\n"
                        + _tail(self.log_path)
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(f"{self.url}/_matrix/client/versions") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Idempotent."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def restart(self) -> None:
        """Stop and start again on the same port and database (about 2 s)."""
        await self.stop()
        await self.launch()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- HTTP ----------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        token: str | None = None,
        params: dict[str, str] | None = None,
        expect: int | None = 200,
    ) -> Any:
        """One JSON call to this Synapse; raises SynapseError if the status is not `expect`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.request(
                method, self.url + path, json=json_body, headers=headers, params=params
            ) as resp,
        ):
            body = await resp.json(content_type=None)
            if expect is not None and resp.status != expect:
                raise SynapseError(f"{method} {path}: HTTP {resp.status}: {body}")
            return body

    async def register_user(self, localpart: str, password: str, *, admin: bool = False) -> str:
        """Create a user with the shared-secret admin API (no device is made); return its MXID."""
        nonce = (await self.request("GET", "/_synapse/admin/v1/register"))["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce.encode(), localpart.encode(), password.encode()):
            mac.update(part)
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = await self.request(
            "POST",
            "/_synapse/admin/v1/register",
            json_body={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
                "inhibit_login": True,
            },
        )
        user_id: str = body["user_id"]
        return user_id

    async def login(
        self, localpart: str, password: str, *, device_id: str | None = None
    ) -> tuple[str, str]:
        """Password login; return (access_token, device_id). Log out with `logout()` after."""
        payload: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        }
        if device_id is not None:
            payload["device_id"] = device_id
        body = await self.request("POST", "/_matrix/client/v3/login", json_body=payload)
        return body["access_token"], body["device_id"]

    async def logout(self, access_token: str) -> None:
        """Log out the session (and delete its device)."""
        await self.request("POST", "/_matrix/client/v3/logout", json_body={}, token=access_token)


def _prepare(
    workdir: Path,
    port: int | None,
    registrations: Sequence[Path],
    secrets: dict[str, str] | None,
) -> Synapse:
    """Write homeserver.yaml and log.config into `workdir`; nothing runs yet."""
    if not SYNAPSE_PYTHON.exists():
        raise SynapseError(
            f"{SYNAPSE_PYTHON} is missing: run `bash bridge/devstack/install_synapse.sh` "
            "(`make run` and `make test` do it)"
        )
    workdir = workdir.resolve()
    (workdir / "data" / "media_store").mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    config_path = workdir / "homeserver.yaml"
    config = homeserver_config(workdir, port=port, registrations=registrations, secrets=secrets)
    _write_json_yaml(config_path, config)
    _write_json_yaml(workdir / "log.config", _LOG_CONFIG)
    return Synapse(
        workdir=workdir,
        port=port,
        config_path=config_path,
        log_path=workdir / "homeserver.log",
        shared_secret=config["registration_shared_secret"],
    )


async def _generate_keys(synapse: Synapse) -> None:
    """`--generate-keys`: writes the signing key (once per data dir)."""
    proc = await asyncio.create_subprocess_exec(
        str(SYNAPSE_PYTHON),
        "-m",
        "synapse.app.homeserver",
        "-c",
        str(synapse.config_path),
        "--generate-keys",
        cwd=synapse.workdir,
        stdin=subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SynapseError(
            f"synapse --generate-keys failed ({proc.returncode}):\n"
            + out.decode(errors="replace")[-4000:]
        )


async def start_synapse(
    workdir: Path,
    *,
    registrations: Sequence[Path] = (),
    port: int | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    secrets: dict[str, str] | None = None,
) -> Synapse:
    """Start a Synapse with its data in `workdir` and return once it serves clients.

    `registrations` are appservice registration files (see `write_registration`); `port` is
    chosen free when None. Raises SynapseError with the log's tail if it does not come up.
    Reusing a `workdir` reuses its database and signing key.
    """
    synapse = _prepare(workdir, port, registrations, secrets)
    if not (synapse.workdir / "data" / f"{SERVER_NAME}.signing.key").exists():
        await _generate_keys(synapse)
    await synapse.launch(startup_timeout)
    return synapse
