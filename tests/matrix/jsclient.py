"""A Matrix user that sees what Element sees: tests/jsclient/client.mjs (matrix-js-sdk with the
Rust crypto, as Element Web uses it) as a subprocess, driven over line-delimited JSON.

matrix-nio decrypts but cannot say which shield Element shows on a message; this client reports
for each event its type on the wire, what it decrypts to and the SDK's shield
(``getEncryptionInfoForEvent``). ``tests/jsclient/install.sh`` installs the pinned packages
(``make test`` runs it).

    async with js_client(synapse, localpart) as js:   # logged in, crypto on, syncing
        await js.join(room_id)
        events = await js.timeline(room_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from matrix.bridge_stack import PASSWORD
from matrix.synapse import Synapse

JSCLIENT = Path(__file__).resolve().parents[1] / "jsclient"
PROGRAM = JSCLIENT / "client.mjs"
REQUEST_TIMEOUT = 60.0
STDERR_LINES = 60


class JsClientError(Exception):
    """A command failed, or the Node process died (its stderr's end is in the message)."""


@dataclass(frozen=True)
class JsEvent:
    """One event of a room's timeline as the js client sees it."""

    event_id: str
    sender: str
    type: str  # after decryption
    wire_type: str  # as the server has it: m.room.encrypted for an encrypted event
    state_key: str | None
    decryption_failure: bool
    decryption_failure_reason: str | None
    redacted: bool
    msgtype: str | None
    body: str | None
    relation: dict[str, Any] | None
    content: dict[str, Any]
    shield_colour: str | None  # NONE, GREY, RED; None: not an encrypted event it decrypted
    shield_reason: str | None  # EventShieldReason's name (UNKNOWN_DEVICE, ...) or None

    @property
    def encrypted(self) -> bool:
        return self.wire_type == "m.room.encrypted"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> JsEvent:
        return cls(
            event_id=raw["eventId"],
            sender=raw["sender"],
            type=raw["type"],
            wire_type=raw["wireType"],
            state_key=raw["stateKey"],
            decryption_failure=raw["decryptionFailure"],
            decryption_failure_reason=raw["decryptionFailureReason"],
            redacted=raw["redacted"],
            msgtype=raw["msgtype"],
            body=raw["body"],
            relation=raw["relation"],
            content=raw["content"],
            shield_colour=raw["shieldColour"],
            shield_reason=raw["shieldReason"],
        )


class JsClient:
    """The running client. Use :func:`js_client`; each method is one request to the process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._readers = [
            asyncio.create_task(self._read_answers()),
            asyncio.create_task(self._read_stderr()),
        ]
        self.user_id = ""
        self.device_id = ""

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def _died(self) -> JsClientError:
        return JsClientError(
            f"the js client exited with status {self._process.returncode}; its stderr ends:\n"
            f"{self.stderr_tail()}"
        )

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        async for line in self._process.stderr:
            self._stderr.append(line.decode(errors="replace").rstrip())

    async def _read_answers(self) -> None:
        assert self._process.stdout is not None
        try:
            async for line in self._process.stdout:
                try:
                    answer = json.loads(line)
                except json.JSONDecodeError:  # not ours (the protocol is JSON only): keep it
                    self._stderr.append(f"stdout: {line.decode(errors='replace').rstrip()}")
                    continue
                waiter = self._waiting.pop(answer.get("id"), None)
                if waiter is None or waiter.done():
                    continue
                if answer["ok"]:
                    waiter.set_result(answer["result"])
                else:
                    data = answer.get("data")
                    detail = f" ({json.dumps(data)})" if data else ""
                    waiter.set_exception(
                        JsClientError(
                            f"{answer['error']}{detail}; the js client's stderr ends:\n"
                            f"{self.stderr_tail()}"
                        )
                    )
        finally:
            await self._process.wait()
            for _ in range(50):  # the last lines of stderr, which tell why it died
                if self._readers[1].done():
                    break
                await asyncio.sleep(0.02)
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(self._died())
            self._waiting.clear()

    async def request(self, cmd: str, within: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        if self._process.returncode is not None or self._readers[0].done():
            raise self._died()
        assert self._process.stdin is not None
        request_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args}) + "\n"
        try:
            self._process.stdin.write(line.encode())
            await self._process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._waiting.pop(request_id, None)
            await asyncio.wait([self._readers[0]], timeout=5)
            raise self._died() from None
        try:
            return await asyncio.wait_for(waiter, within)
        except TimeoutError:
            self._waiting.pop(request_id, None)
            raise JsClientError(
                f"{cmd}: no answer within {within} s; the js client's stderr ends:\n"
                f"{self.stderr_tail()}"
            ) from None

    # --- the commands ---------------------------------------------------------------------------

    async def login(self, base_url: str, user: str, password: str) -> None:
        result = await self.request("login", baseUrl=base_url, user=user, password=password)
        self.user_id, self.device_id = result["userId"], result["deviceId"]

    async def init_crypto(self) -> None:
        await self.request("initCrypto")

    async def bootstrap_cross_signing(self) -> bool:
        """Cross-signing keys made and uploaded, this device signed; True when ready."""
        return bool((await self.request("bootstrapCrossSigning"))["ready"])

    async def start(self) -> None:
        await self.request("start")

    async def join(self, room_id: str) -> bool:
        """Joins and waits until the client's sync has the join; True if the room is
        encrypted."""
        return bool((await self.request("join", roomId=room_id))["encrypted"])

    async def send_text(self, room_id: str, body: str, msgtype: str = "m.text") -> str:
        """Sends as Element does (encrypted in an encrypted room); returns the event id."""
        return str(
            (await self.request("send", roomId=room_id, body=body, msgtype=msgtype))["eventId"]
        )

    async def timeline(self, room_id: str, limit: int = 200) -> list[JsEvent]:
        """The room's last ``limit`` events, oldest first, decrypted now where the client has
        the room key."""
        raw = await self.request("timeline", roomId=room_id, limit=limit)
        return [JsEvent.parse(event) for event in raw]

    async def wait_timeline(
        self,
        room_id: str,
        predicate: Callable[[list[JsEvent]], bool],
        what: str,
        within: float = 60.0,
    ) -> list[JsEvent]:
        """Polls the timeline until ``predicate`` holds on it; returns that timeline."""
        events: list[JsEvent] = []
        try:
            async with asyncio.timeout(within):
                while not predicate(events := await self.timeline(room_id)):  # noqa: ASYNC110
                    await asyncio.sleep(0.5)
        except TimeoutError:
            seen = [(e.sender, e.type, e.body, e.decryption_failure) for e in events[-15:]]
            raise AssertionError(
                f"{self.user_id}: no {what} after {within} s; last: {seen}"
            ) from None
        return events

    async def close(self) -> None:
        """Stops syncing and ends the process (killed if it does not end)."""
        if self._process.returncode is None:
            with contextlib.suppress(JsClientError):
                await self.request("stop", within=10)
            if self._process.stdin is not None:
                self._process.stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)


def node() -> str:
    found = shutil.which("node")
    if found is None or not (JSCLIENT / "node_modules" / "matrix-js-sdk").is_dir():
        pytest.fail(
            "The js test client is not installed (node, tests/jsclient/node_modules): run "
            "`bash tests/jsclient/install.sh` (`make test` runs it).",
            pytrace=False,
        )
    return found


@asynccontextmanager
async def js_client(
    synapse: Synapse, localpart: str, *, cross_signing: bool = True
) -> AsyncIterator[JsClient]:
    """``localpart`` (password :data:`PASSWORD`) logged in as a new device with the Rust crypto,
    cross-signing bootstrapped (as Element does at the first login) and syncing."""
    process = await asyncio.create_subprocess_exec(
        node(),
        str(PROGRAM),
        cwd=JSCLIENT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
        limit=64 * 1024 * 1024,  # a timeline is one line
    )
    client = JsClient(process)
    try:
        await client.login(synapse.url, localpart, PASSWORD)
        await client.init_crypto()
        if cross_signing:
            assert await client.bootstrap_cross_signing(), "cross-signing not ready"
        await client.start()
        yield client
    finally:
        await client.close()
