"""History into a new portal (backfill, bridge/portal/backfill.py), against a real Synapse.

A native member makes a Kalandra room with the bridge's bot in it but no portal and sends N
messages; the bridge keeps them (its ``bridge_backfill`` table holds N rows once it has them
all). Then the Matrix admin opens a portal on the room through the bot (``!kalandra open``),
and the portal sends that history first. The backfill's time is from the bridge's log line
that starts it to the one that ends it (after the last message and the final progress notice
are in Synapse); the admin then reads the portal's whole history and the benchmark checks that
every message arrived once, in log order. Setup (room, history, buffering) is not measured.
For context it also prints the CPU time the bridge and Synapse spent per message (from /proc,
portal creation included): Synapse's is most of a send's time.

The limit, measured in the same run: Synapse's own send rate for an appservice user (what a
ghost is), one request at a time, into a room with a local user in it (bench/bridge.py), half
of its sends just before the backfill and half just after. A backfill sends in log order, one
message after the other, so that is its bound.
Target: rate >= 0.90 x the limit. N = 300 quick / 2,000 full.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import secrets
import sqlite3
import time
from typing import Any
from urllib.parse import quote

from bridge.bot import BOT_MEMBER_NAME
from kalandra_core.client.driver import Client
from kalandra_core.storage.sql import SqlStore

from ._bridge_stack import BOT, BridgeBenchStack, MatrixUser, bot_command, run_on_stack
from .bridge import RATE_TARGET, _ghost_rate
from .common import Figure, Results, cpu_seconds

_BATCH = 50  # native sends in flight while writing the history
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_LOG_INDEX_KEY = "org.kalandra.log_index"


async def _history(native: Client, room: bytes, n: int) -> list[int]:
    """``n`` messages from ``native`` into ``room``; their log indexes, in order."""
    indexes: list[int] = []
    for start in range(0, n, _BATCH):
        sends = (
            native.send_text(room, f"history {i}") for i in range(start, min(n, start + _BATCH))
        )
        indexes += await asyncio.gather(*sends)
    while not native.messages.empty():  # its own echoes are not looked at
        native.messages.get_nowait()
    return sorted(indexes)


def _kept(database: str, room: bytes) -> int:
    path = database.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM bridge_backfill WHERE room_id = ?", (room,)
        ).fetchone()
    return int(row[0])


async def _until_kept(stack: BridgeBenchStack, room: bytes, n: int, within: float) -> None:
    """Until the bridge has kept the whole history (the rows are written in batches)."""
    async with asyncio.timeout(within):
        while await asyncio.to_thread(_kept, stack.database_url, room) < n:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


def _log_time(stack: BridgeBenchStack, needle: str) -> float | None:
    """The time (epoch seconds) of the bridge's last log line containing ``needle``."""
    found = None
    for line in stack.log.read_text(errors="replace").splitlines():
        if needle in line and (match := _LOG_TIME.match(line)):
            found = match.group(1)
    if found is None:
        return None
    when = datetime.datetime.strptime(found, "%Y-%m-%d %H:%M:%S,%f")
    return when.timestamp()  # local time, as the bridge logged it


async def _until_logged(stack: BridgeBenchStack, needle: str, within: float) -> float:
    async with asyncio.timeout(within):
        while (when := _log_time(stack, needle)) is None:
            if not stack.bridge_alive():
                raise RuntimeError(f"the bridge process died:\n{stack.log_tail()}")
            await asyncio.sleep(0.2)
    return when


async def _room_messages(user: MatrixUser, room: str) -> list[dict[str, Any]]:
    """Every m.room.message of ``room``, oldest first."""
    events: list[dict[str, Any]] = []
    params = {"dir": "f", "limit": "1000", "filter": '{"types": ["m.room.message"]}'}
    while True:
        page = await user.request("GET", f"/rooms/{quote(room, safe='')}/messages", params=params)
        events += page.get("chunk", [])
        if not page.get("chunk") or "end" not in page:
            return events
        params["from"] = page["end"]


async def _open_portal(admin: MatrixUser, room: bytes) -> str:
    """``!kalandra open`` in a direct chat with the bot; the admin joins the portal."""
    dm = await admin.create_room(invite=[BOT], direct=True)
    await admin.sync_until(
        lambda events: any(
            e.room_id == dm and e.sender == BOT and e.content.get("msgtype") == "m.notice"
            for e in events
        ),
        "the bot's welcome",
    )
    async with asyncio.timeout(60):
        while True:
            answer = await bot_command(admin, dm, f"!kalandra open {room.hex()}")
            if answer.startswith("Portal of"):
                break
            await asyncio.sleep(1)  # the bot may not have the room's Welcome yet
    await admin.sync_until(lambda _: bool(admin.invites), "the portal's invite")
    portal = admin.invites.pop()
    await admin.join(portal)
    return portal


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    n = 300 if quick else 2_000
    n_limit = 200 if quick else 1_000
    within = 120.0 if quick else 600.0

    t0 = time.perf_counter()
    admin = await stack.matrix_user(admin_name)
    reference = await stack.matrix_user(f"benchref_{secrets.token_hex(3)}")
    ghost = await stack.appservice_user(f"kalandra_benchref{secrets.token_hex(3)}")
    native = await stack.native_client()
    store = await SqlStore.open(stack.database_url, migrate=False)
    try:
        bot = await store.find_member(BOT_MEMBER_NAME)
    finally:
        await store.close()
    assert bot is not None
    room = await native.create_room(name="bench history")
    await native.invite(room, [bot.member_id])
    await native.settle()
    indexes = await _history(native, room, n)
    await _until_kept(stack, room, n, within)
    print(
        f"bridge-backfill: setup (room, {n:,} messages kept by the bridge) "
        f"{time.perf_counter() - t0:.1f} s"
    )

    # Half of the limit's sends before the backfill and half after: the machine's load drifts
    # (it is shared), and this way both sides see the same drift.
    before, _ = await _ghost_rate(ghost, reference, n_limit // 2)

    bridge_pid = stack.bridge.pid if stack.bridge else None
    synapse_pid = stack.synapse.process.pid if stack.synapse.process else None
    cpu_before = cpu_seconds(bridge_pid), cpu_seconds(synapse_pid)
    portal = await _open_portal(admin, room)
    started = await _until_logged(stack, f"backfilling {n} messages", within)
    ended = await _until_logged(stack, f"backfill done ({n} messages)", within)
    pids = (bridge_pid, synapse_pid)
    cpu = [(cpu_seconds(p) - b) * 1000 / n for p, b in zip(pids, cpu_before, strict=True)]
    rate = n / max(ended - started, 1e-3)

    after, _ = await _ghost_rate(ghost, reference, n_limit // 2)
    limit = 2 / (1 / before + 1 / after)  # N sends over the time both halves took
    print(
        f"bridge-backfill limit: Synapse send N={n_limit:,} one at a time, appservice user,"
        f" room with a local user: {limit:,.1f} msgs/s (half before the backfill:"
        f" {before:,.1f}, half after: {after:,.1f})"
    )

    events = await _room_messages(admin, portal)
    got = [e["content"].get(_LOG_INDEX_KEY) for e in events if e["sender"] != BOT]
    notices = [e["content"]["body"] for e in events if e["sender"] == BOT]
    ok = got == indexes
    print(
        f"bridge-backfill: {n:,} messages in {ended - started:.1f} s = {rate:,.1f} msgs/s;"
        f" in Matrix: {len(got):,} ({len(set(got)):,} distinct), all once and in log order:"
        f" {ok}; {len(notices)} progress notices; CPU per message (portal creation included):"
        f" bridge {cpu[0]:.1f} ms, Synapse {cpu[1]:.1f} ms"
    )
    if not ok:
        raise RuntimeError("the backfill lost, doubled or reordered messages")
    tracebacks = stack.tracebacks()
    if tracebacks:
        print(f"bridge-backfill: {tracebacks} tracebacks in the bridge's log:\n{stack.log_tail()}")
    figures = [
        Figure(
            f"bridge backfill, {n:,} msgs",
            rate,
            "msgs/s",
            f">= {RATE_TARGET:.2f} x limit",
            "Synapse AS send 1-at-a-time",
            limit,
            decimals=1,
        )
    ]
    return Results(figures)


def run(quick: bool) -> Results:
    return run_on_stack("bridge-backfill", _measure, quick)
