"""Encrypted portals against unencrypted ones through the Matrix bridge: messages/s both ways
into an encrypted portal and into an unencrypted one, measured in the same run.

The stack is bench/bridge.py's (a throwaway Synapse from ``.venv-synapse/``, the bridge as its
own process on SQLite; skipped when Synapse is not installed), with the bot's device for
end-to-bridge encryption. Setup (not measured): two portals with the same native member, one
turned encrypted by the Matrix admin (``m.room.encryption``); the admin's Matrix client is
matrix-nio with E2EE (vodozemac, a new device), as in the bridge tests; a few messages each way
in each portal first, so ghosts, the puppet leaf and the Megolm sessions exist before anything
is timed.

Measured, N messages per portal and direction (N = 60 quick / 1,000 full), unencrypted portal
first, then the encrypted one, the same way:

* the limit: bench/bridge.py's, an appservice user (what a ghost is) sending to Synapse one
  request at a time into a room with a local user in it.
* native -> Matrix: the native member sends N at once; the nio client times the ghost's events
  as its /sync carries them, decrypted (in the encrypted portal the decryption on the receiving
  client is in the figure, as it is for any Matrix user; an event nio cannot decrypt is counted
  and reported, never as arrived).
* Matrix -> native: the nio client sends N one request at a time (encrypting each in the
  encrypted portal, as any client does); the native member times arrivals.

Throughput is messages received over the time from the first send to the last arrival. The
table holds each portal's rate against the limit, and encrypted / unencrypted.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from urllib.parse import quote

from nio import (
    AsyncClient,
    AsyncClientConfig,
    LoginResponse,
    MegolmEvent,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)
from nio.store import SqliteMemoryStore

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

from ._bridge_stack import PASSWORD, BridgeBenchStack, run_on_stack
from .bridge import WARMUP, Arrivals, Run, _body, _drain, _ghost_rate, _native_receiver
from .common import Figure, Results

_FILTER = {"room": {"timeline": {"limit": 5000}}, "presence": {"not_types": ["*"]}}
_MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}


class SyncingReceiver:
    """A nio client's sync loop noting the ghosts' texts as they come (``_arrivals`` says where,
    ``_ours`` whose) and counting what it could not decrypt; shared by the encrypted benches."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.undecrypted = 0
        self._task: asyncio.Task[None] | None = None

    def _ours(self, room_id: str, sender: str) -> bool:
        raise NotImplementedError

    def _arrivals(self, room_id: str, event: RoomMessageText) -> Arrivals | None:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            response = await self.client.sync(timeout=1_000, sync_filter=_FILTER)
            arrived = time.time()
            if not isinstance(response, SyncResponse):
                continue
            for room_id, room in response.rooms.join.items():
                for event in room.timeline.events:
                    if not self._ours(room_id, str(getattr(event, "sender", ""))):
                        continue
                    if isinstance(event, MegolmEvent):
                        self.undecrypted += 1
                    elif isinstance(event, RoomMessageText):
                        seen = self._arrivals(room_id, event)
                        if seen is not None:
                            seen.note(event.body, arrived)
            await self.client.send_to_device_messages()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def raise_failure(self) -> None:
        """The sync loop's failure, if it stopped."""
        if self._task is not None and self._task.done():
            self._task.result()


class _Receiver(SyncingReceiver):
    """The ghost's texts, per portal (the current run's arrivals of each)."""

    def __init__(self, client: AsyncClient, ghost: str) -> None:
        super().__init__(client)
        self.ghost = ghost
        self.seen: dict[str, Arrivals] = {}  # portal -> the current run's arrivals

    def _ours(self, room_id: str, sender: str) -> bool:
        return sender == self.ghost

    def _arrivals(self, room_id: str, event: RoomMessageText) -> Arrivals | None:
        return self.seen.get(room_id)

    async def wait(self, seen: Arrivals, count: int, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(seen.arrived) < count and loop.time() < deadline:
            self.raise_failure()
            await asyncio.sleep(0.05)


async def _e2ee_client(stack: BridgeBenchStack, localpart: str) -> AsyncClient:
    config = AsyncClientConfig(encryption_enabled=True, store=SqliteMemoryStore)
    client = AsyncClient(stack.synapse.url, stack.synapse.mxid(localpart), config=config)
    login = await client.login(PASSWORD, device_name="bench")
    if not isinstance(login, LoginResponse):
        raise RuntimeError(f"bridge encrypted: nio login failed: {login}")
    if client.should_upload_keys:
        await client.keys_upload()
    return client


async def _send(client: AsyncClient, portal: str, body: str) -> bool:
    if client.should_query_keys:
        await client.keys_query()
    sent = await client.room_send(
        portal,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        ignore_unverified_devices=True,  # the bridge's device is not verified
    )
    return isinstance(sent, RoomSendResponse)


async def _native_to_matrix(
    receiver: _Receiver,
    native: Client,
    room: bytes,
    portal: str,
    label: str,
    count: int,
    within: float,
) -> Run:
    seen = Arrivals(f"n2m-{secrets.token_hex(3)}")
    receiver.seen[portal] = seen
    start = time.perf_counter()
    acks: list[asyncio.Task[int]] = []
    for i in range(count):
        acks.append(asyncio.create_task(native.send(room, Content(_body(seen.tag, i)))))
        await asyncio.sleep(0)  # out now: the time in the body is the send time
    span = time.perf_counter() - start
    results = await asyncio.gather(*acks, return_exceptions=True)
    await receiver.wait(seen, count, within)
    _drain(native)
    failures = sum(isinstance(r, BaseException) for r in results)
    return Run(label, count, failures, span, seen)


async def _matrix_to_native(
    client: AsyncClient, native: Client, portal: str, label: str, count: int, within: float
) -> Run:
    seen = Arrivals(f"m2n-{secrets.token_hex(3)}")
    _drain(native)
    receiving = asyncio.create_task(_native_receiver(native, seen, count, within))
    failures = 0
    start = time.perf_counter()
    for i in range(count):
        failures += not await _send(client, portal, _body(seen.tag, i))
    span = time.perf_counter() - start
    await receiving
    return Run(label, count, failures, span, seen)


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    n = 60 if quick else 1_000
    within = 120.0 if quick else 600.0
    t0 = time.perf_counter()
    admin = await stack.matrix_user(admin_name)
    native = await stack.native_client()
    portals: dict[str, tuple[bytes, str]] = {}
    for kind in ("unencrypted", "encrypted"):
        room = await stack.portal_with_native(admin, native, f"bench {kind}")
        portals[kind] = (room, stack.portal)
    secret = portals["encrypted"][1]
    await admin.request("PUT", f"/rooms/{quote(secret, safe='')}/state/m.room.encryption", _MEGOLM)
    client = await _e2ee_client(stack, admin_name)
    receiver = _Receiver(client, f"@kalandra_{native.core.member_id}:{stack.synapse.server_name}")
    receiver.start()
    try:
        for kind, (room, portal) in portals.items():  # warm-up: not timed
            for run in (
                await _native_to_matrix(receiver, native, room, portal, kind, WARMUP, within),
                await _matrix_to_native(client, native, portal, kind, WARMUP, within),
            ):
                if run.received < WARMUP:
                    raise RuntimeError(
                        f"bridge encrypted: warm-up in the {kind} portal: {run.report()}; "
                        f"bridge log:\n{stack.log_tail(8000)}"
                    )
        if not client.rooms[secret].encrypted:
            raise RuntimeError("bridge encrypted: the portal did not turn encrypted")
        print(
            f"bridge encrypted: setup (two portals, native member, E2EE client, warm-up) "
            f"{time.perf_counter() - t0:.1f} s; N={n:,} per portal and direction"
        )
        reference = await stack.matrix_user(f"benchref_{secrets.token_hex(3)}")
        ghost = await stack.appservice_user(f"kalandra_benchref{secrets.token_hex(3)}")
        limit, _ = await _ghost_rate(ghost, reference, n)
        print(f"bridge encrypted: the limit (Synapse AS send, 1 at a time) {limit:,.1f} msgs/s")
        runs: dict[tuple[str, str], Run] = {}
        for kind, (room, portal) in portals.items():
            label = f"native->Matrix {kind} portal, max rate"
            run = await _native_to_matrix(receiver, native, room, portal, label, n, within)
            runs["n2m", kind] = run
            print(run.report())
        for kind, (_, portal) in portals.items():
            label = f"Matrix->native {kind} portal, max rate"
            runs["m2n", kind] = await _matrix_to_native(client, native, portal, label, n, within)
            print(runs["m2n", kind].report())
    finally:
        await receiver.stop()
        await client.close()
    if receiver.undecrypted:
        print(f"bridge encrypted: {receiver.undecrypted} ghost events nio could not decrypt")
    if stack.tracebacks():
        print(f"bridge encrypted: tracebacks in the bridge's log:\n{stack.log_tail()}")

    figures = [
        Figure(
            "Synapse send, appservice user, 1 at a time",
            limit,
            "msgs/s",
            "- (the limit)",
            "itself",
            limit,
            decimals=1,
        )
    ]
    for way, name in (("n2m", "native->Matrix"), ("m2n", "Matrix->native")):
        plain, secret_run = runs[way, "unencrypted"], runs[way, "encrypted"]
        for kind, run in (("unencrypted", plain), ("encrypted", secret_run)):
            figures.append(
                Figure(
                    f"bridge {name}, {kind} portal",
                    run.throughput,
                    "msgs/s",
                    "-",
                    "Synapse AS send 1-at-a-time",
                    limit,
                    decimals=1,
                )
            )
        figures.append(
            Figure(
                f"bridge {name}, encrypted / unencrypted",
                secret_run.throughput,
                "msgs/s",
                "-",
                "unencrypted portal",
                plain.throughput,
                decimals=1,
            )
        )
    return Results(figures)


def run(quick: bool) -> Results:
    return run_on_stack("bridge-encrypted", _measure, quick, encryption=True)
