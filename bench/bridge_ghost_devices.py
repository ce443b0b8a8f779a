"""What ghosts' own devices (``bridge.encryption.ghost_devices``) cost against the bot's device,
native -> Matrix in an encrypted portal, both measured in the same run on the same stack.

The stack is bench/bridge.py's (a throwaway Synapse, the bridge as its own process on SQLite;
skipped when Synapse is not installed), with end-to-bridge encryption. After the setup the
bridge is restarted with ``ghost_devices`` off (the bot's device encrypts for every ghost) and
measured, then restarted with it on (each ghost encrypts with a device of its own) and measured
the same way, the same portal and Matrix devices throughout: each mode runs in a bridge process
just started. Setup (not measured): a portal with a native member, turned encrypted by the Matrix
admin; the admin has two matrix-nio E2EE devices (vodozemac), one of which syncs and times
arrivals (decrypted), the other only has keys: a ghost's Megolm session goes to both. After
each start, a few messages from the native member first (with ghost devices, its ghost's device
is made then), so the steady figures hold no one-off cost.

Measured in each mode, in this order (the steady state first: for a few seconds after new
ghost devices are made, messages were seen delayed by up to a second, cause not pinned down,
which the steady figures would otherwise hold):

* steady latency: the native member of the setup sends N messages at a steady rate (10/s; N = 20
  quick / 200 full), p50 and p99 from the send to the nio client's decrypted arrival.
* throughput: N messages at once, messages received over the time from the first send to the
  last arrival.
* a new native member's first message: the member is added to the room (through the bot, in the
  admin's direct chat with it), joins, its ghost's join reaches the nio client, then it sends
  one message, timed from the send to its arrival, decrypted, at the nio client. With ghost
  devices this holds the ghost's device being made (MSC4190), its keys and cross-signing keys
  uploaded, Olm sessions with the recipients' devices (one-time keys claimed) and its Megolm
  session sent to them; with the bot's device, only a Megolm encryption with the bot's session
  already shared. M new members (2 quick / 8 full), the median.
* in the bridge, from its metrics (``kalandra_bridge_megolm_encrypt_seconds``, and
  ``kalandra_bridge_ghost_device_setup_seconds`` printed alongside): the mean time encrypting a
  new member's first message took (with ghost devices, its device made and its session shared
  included), and one of the steady messages. These hold only the bridge's own work, so they
  move less with the machine's load than the end-to-end figures, which go through Synapse and
  the nio client (on a busy 2-core machine their ratios swing either way from run to run).

Each figure is given with ghost devices against the bot's device (the limit column is the bot
device's figure of the same run, the ratio ghost / bot); absolute milliseconds in both columns.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from nio import (
    AsyncClient,
    RoomMessageText,
)

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

from ._bridge_stack import BridgeBenchStack, MatrixUser, bot_command, run_on_stack
from .bridge import WARMUP, Arrivals, Run, _body, _drain, _percentile
from .bridge_encrypted import SyncingReceiver, _e2ee_client
from .common import Distribution, Figure, Results

STEADY_RATE = 10.0  # msgs/s
_MEGOLM = {"algorithm": "m.megolm.v1.aes-sha2"}
_MODES = ("bot device", "ghost devices")


class _Receiver(SyncingReceiver):
    """The texts of the bridge's ghosts in the portal, by the tag in their bodies; tells who
    joined."""

    def __init__(self, client: AsyncClient, portal: str, ghost_prefix: str) -> None:
        super().__init__(client)
        self.portal = portal
        self.ghost_prefix = ghost_prefix
        self.seen: dict[str, Arrivals] = {}  # tag -> arrivals

    def _ours(self, room_id: str, sender: str) -> bool:
        return room_id == self.portal and sender.startswith(self.ghost_prefix)

    def _arrivals(self, room_id: str, event: RoomMessageText) -> Arrivals | None:
        return self.seen.get(event.body.split(" ", 1)[0])

    async def until(self, done: Callable[[], bool], what: str, within: float) -> None:
        """Until ``done()`` is true (the sync loop's failure is raised)."""
        try:
            async with asyncio.timeout(within):
                while not done():
                    self.raise_failure()
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise RuntimeError(f"bridge ghost devices: no {what} within {within:g} s") from None

    def joined(self, user_id: str) -> bool:
        room = self.client.rooms.get(self.portal)
        return room is not None and user_id in room.users and user_id not in room.invited_users


@dataclass(frozen=True, slots=True)
class ModeResult:
    first_ms: list[float]  # each new member's first message, end to end
    first_costs: Costs  # their encryption in the bridge
    steady: Run
    burst: Run
    steady_costs: Costs  # the encryption of the steady and max-rate messages


async def _native_to_matrix(
    receiver: _Receiver,
    native: Client,
    room: bytes,
    label: str,
    count: int,
    per_second: float | None,
    within: float,
) -> Run:
    seen = Arrivals(f"gd-{secrets.token_hex(3)}")
    receiver.seen[seen.tag] = seen
    acks: list[asyncio.Task[int]] = []
    start = time.perf_counter()
    for i in range(count):
        if per_second is not None:
            delay = start + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        acks.append(asyncio.create_task(native.send(room, Content(_body(seen.tag, i)))))
        await asyncio.sleep(0)  # out now: the time in the body is the send time
    span = time.perf_counter() - start
    results = await asyncio.gather(*acks, return_exceptions=True)
    await receiver.until(lambda: len(seen.arrived) >= count, f"{count} messages ({label})", within)
    _drain(native)
    failures = sum(isinstance(r, BaseException) for r in results)
    return Run(label, count, failures, span, seen)


async def _first_message(
    stack: BridgeBenchStack,
    admin: MatrixUser,
    receiver: _Receiver,
    room: bytes,
    within: float,
) -> float:
    """A new native member is added and joins; its first message's latency, ms."""
    native = await stack.native_client()
    answer = await bot_command(
        admin, stack.dm, f"!kalandra invite {room.hex()} {native.core.member_id}", within
    )
    if not answer.startswith("Added member"):
        raise RuntimeError(f"bridge ghost devices: unexpected answer to invite: {answer!r}")
    if await asyncio.wait_for(native.joined.get(), within) != room:
        raise RuntimeError("bridge ghost devices: the new member joined another room")
    await native.settle()
    ghost = f"{receiver.ghost_prefix}{native.core.member_id}:{stack.synapse.server_name}"
    await receiver.until(lambda: receiver.joined(ghost), "join of the new member's ghost", within)
    run = await _native_to_matrix(receiver, native, room, "first message", 1, None, within)
    await native.close()
    return run.seen.latencies_ms()[0]


async def _mode(
    stack: BridgeBenchStack,
    admin: MatrixUser,
    receiver: _Receiver,
    native: Client,
    room: bytes,
    mode: str,
    quick: bool,
) -> ModeResult:
    members = 2 if quick else 8
    n = 20 if quick else 200
    within = 120.0 if quick else 600.0
    # Warm-up: with ghost devices, the native member's ghost gets its device here.
    await _native_to_matrix(receiver, native, room, f"{mode} warm-up", WARMUP, None, within)
    # The steady state first: messages right after new ghost devices were seen delayed.
    before = await stack.metrics()
    steady = await _native_to_matrix(
        receiver, native, room, f"{mode} at {STEADY_RATE:g}/s", n, STEADY_RATE, within
    )
    print(steady.report())
    burst = await _native_to_matrix(receiver, native, room, f"{mode} max rate", n, None, within)
    print(burst.report())
    after_steady = await stack.metrics()
    steady_costs = Costs.between(before, after_steady)
    print(f"bridge ghost devices, {mode}: those messages, in the bridge: {steady_costs}")
    first = [await _first_message(stack, admin, receiver, room, within) for _ in range(members)]
    first_costs = Costs.between(after_steady, await stack.metrics())
    print(
        f"bridge ghost devices, {mode}: new member's first message "
        + ", ".join(f"{ms:,.0f}" for ms in first)
        + f" ms; in the bridge: {first_costs}"
    )
    if not stack.bridge_alive():
        raise RuntimeError(f"the bridge process died:\n{stack.log_tail()}")
    return ModeResult(first, first_costs, steady, burst, steady_costs)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True, slots=True)
class Costs:
    """What the bridge's metrics say encryption cost it between two scrapes."""

    encryptions: int
    encrypt_ms: float  # mean, each including the making of a ghost's device where there was one
    devices: int  # ghost devices made
    device_ms: float  # mean

    @classmethod
    def between(cls, before: Samples, after: Samples) -> Costs:
        def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> tuple[int, float]:
            count = after.get((f"{name}_count", labels), 0)
            count -= before.get((f"{name}_count", labels), 0)
            total = after.get((f"{name}_sum", labels), 0) - before.get((f"{name}_sum", labels), 0)
            return int(count), (total / count * 1000 if count else float("nan"))

        encryptions, total_ms = 0, 0.0
        for device in ("bot", "ghost"):
            count, ms = delta("kalandra_bridge_megolm_encrypt_seconds", (("device", device),))
            if count:
                encryptions, total_ms = encryptions + count, total_ms + count * ms
        devices, device_ms = delta("kalandra_bridge_ghost_device_setup_seconds")
        mean = total_ms / encryptions if encryptions else float("nan")
        return cls(encryptions, mean, devices, device_ms)

    def __str__(self) -> str:
        text = f"{self.encryptions} encryptions, mean {self.encrypt_ms:,.1f} ms"
        if self.devices:
            text += f" (with {self.devices} ghost devices made, mean {self.device_ms:,.0f} ms)"
        return text


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    t0 = time.perf_counter()
    admin = await stack.matrix_user(admin_name)
    native = await stack.native_client()
    room = await stack.portal_with_native(admin, native, "bench ghost devices")
    portal = stack.portal
    await admin.request("PUT", f"/rooms/{quote(portal, safe='')}/state/m.room.encryption", _MEGOLM)
    # Both of the admin's E2EE devices exist before anything is encrypted (a new device later
    # would end the sessions in between).
    client = await _e2ee_client(stack, admin_name)
    second = await _e2ee_client(stack, admin_name)
    receiver = _Receiver(client, portal, "@kalandra_")
    receiver.start()
    results: dict[str, ModeResult] = {}
    try:
        await receiver.until(lambda: portal in client.rooms, "portal in the nio client", 60)
        print(
            f"bridge ghost devices: setup (portal, native member, 2 E2EE devices) "
            f"{time.perf_counter() - t0:.1f} s"
        )
        for mode, on in zip(_MODES, (False, True), strict=True):
            # Each mode in a bridge process just started (and warmed up in _mode): the setup
            # warmed the first process up more than a warm-up can, which favoured its mode.
            restart = await stack.restart_bridge({"bridge.encryption.ghost_devices": on})
            await native.wait_connected()
            print(f"bridge ghost devices: bridge restarted for the {mode} in {restart:.1f} s")
            results[mode] = await _mode(stack, admin, receiver, native, room, mode, quick)
        if not client.rooms[portal].encrypted:
            raise RuntimeError("bridge ghost devices: the portal did not turn encrypted")
    finally:
        await receiver.stop()
        await client.close()
        await second.close()
    if receiver.undecrypted:
        print(f"bridge ghost devices: {receiver.undecrypted} events nio could not decrypt")
    if stack.tracebacks():
        print(f"bridge ghost devices: tracebacks in the bridge's log:\n{stack.log_tail()}")

    bot, ghost = results[_MODES[0]], results[_MODES[1]]
    steady = f"{STEADY_RATE:g} msgs/s"

    def ms(name: str, ghost_ms: float, bot_ms: float) -> Figure:
        return Figure(name, ghost_ms, "ms", "-", "bot device", bot_ms, decimals=1)

    bot_lat, ghost_lat = bot.steady.seen.latencies_ms(), ghost.steady.seen.latencies_ms()
    figures = [
        ms(
            f"ghost devices: new member's 1st message (median of {len(ghost.first_ms)})",
            statistics.median(ghost.first_ms),
            statistics.median(bot.first_ms),
        ),
        ms(
            "ghost devices: new member's 1st message, encrypting it",
            ghost.first_costs.encrypt_ms,
            bot.first_costs.encrypt_ms,
        ),
        ms(
            "ghost devices: encrypting one more message",
            ghost.steady_costs.encrypt_ms,
            bot.steady_costs.encrypt_ms,
        ),
        ms(
            f"ghost devices: native->Matrix p50 @ {steady}",
            _percentile(ghost_lat, 50),
            _percentile(bot_lat, 50),
        ),
        ms(
            f"ghost devices: native->Matrix p99 @ {steady}",
            _percentile(ghost_lat, 99),
            _percentile(bot_lat, 99),
        ),
        Figure(
            "ghost devices: native->Matrix, max rate",
            ghost.burst.throughput,
            "msgs/s",
            "-",
            "bot device",
            bot.burst.throughput,
            decimals=1,
        ),
    ]
    distributions = [
        Distribution(
            f"native->Matrix encrypted, {mode}", tuple(r.steady.seen.latencies_ms()), steady
        )
        for mode, r in results.items()
    ]
    return Results(figures, distributions)


def run(quick: bool) -> Results:
    return run_on_stack(
        "bridge-ghost-devices", _measure, quick, encryption=True, ghost_devices=False
    )
