"""Media through the Matrix bridge, native -> Matrix: MiB/s of one file (4 MiB quick, 16 MiB
full) against a direct upload of the same bytes to Synapse's media repository, same run.
Target: >= 0.50 x the limit.

The stack is bench/bridge.py's (a throwaway Synapse from ``.venv-synapse/``, the bridge as its
own process on SQLite, unencrypted portal; skipped when Synapse is not installed). Setup (not
measured): a portal with a native member, and one small file bridged first so the ghost exists
and is in the room.

Measured, best of 1 run (quick) or 3 (full), random bytes each run:

* the limit: an appservice user of the bridge's namespace (what a ghost is) uploads the file to
  Synapse (``POST /_matrix/media/v3/upload``, one request); size over the time to the answer.
* through the bridge: the native member stores the file as encrypted blocks
  (``upload_media``) and sends the message; the bot reads the blocks back and streams them into
  the ghost's upload, then the ghost sends ``m.file``. Size over the time from the start of
  ``upload_media`` to the Matrix admin's /sync carrying the event. Printed besides: the native
  upload alone and the bridge's own part (native send -> event). Each run's file is downloaded
  by the admin afterwards and compared byte for byte (a mismatch fails the benchmark).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client

from ._bridge_stack import BridgeBenchStack, MatrixUser, run_on_stack
from .common import Figure, Results

MIB = 1024 * 1024
WITHIN = 300.0


@dataclass(frozen=True, slots=True)
class Run:
    upload_s: float  # native upload_media
    bridge_s: float  # native send -> the ghost's event at the admin's /sync
    total_s: float  # upload start -> event


async def _bridged(
    admin: MatrixUser, native: Client, room: bytes, portal: str, data: bytes, name: str
) -> tuple[Run, str]:
    """One file native -> Matrix: the timings and the event's mxc URI."""
    await admin.sync(0)  # from now on
    found: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        while not found.done():
            for event in await admin.sync(1_000):
                content = event.content
                if event.room_id == portal and content.get("body") == name:
                    found.set_result((event.arrived, str(content.get("url"))))
                    return

    watcher = asyncio.create_task(watch())
    try:
        start = time.time()
        ref = await native.upload_media(
            room, data, mimetype="application/octet-stream", name=name, kind="file"
        )
        uploaded = time.time()
        await native.send(room, Content(body=name, kind="file", media=ref))
        arrived, url = await asyncio.wait_for(asyncio.shield(found), WITHIN)
    finally:
        watcher.cancel()
    return Run(uploaded - start, arrived - uploaded, arrived - start), url


async def _measure(stack: BridgeBenchStack, admin_name: str, quick: bool) -> Results:
    size = (4 if quick else 16) * MIB
    repeats = 1 if quick else 3
    t0 = time.perf_counter()
    admin = await stack.matrix_user(admin_name)
    native = await stack.native_client()
    room = await stack.portal_with_native(admin, native, "bench media")
    portal = stack.portal
    await _bridged(admin, native, room, portal, os.urandom(1000), "warm-up.bin")
    direct = await stack.appservice_user(f"kalandra_benchmedia{secrets.token_hex(3)}")
    print(
        f"bridge media: setup (portal, native member, warm-up file) "
        f"{time.perf_counter() - t0:.1f} s; file {size // MIB} MiB, best of {repeats}"
    )

    limit_s, runs = float("inf"), []
    for i in range(repeats):
        data = os.urandom(size)
        start = time.perf_counter()
        await direct.upload(data, "application/octet-stream")
        limit_s = min(limit_s, time.perf_counter() - start)
        run, url = await _bridged(admin, native, room, portal, data, f"bench-{i}.bin")
        runs.append(run)
        if await admin.download(url) != data:
            raise RuntimeError("bridge media: the file on Matrix differs from the native one")
        print(
            f"bridge media run {i + 1}: direct upload {size / MIB / limit_s:.1f} MiB/s (best so"
            f" far); through the bridge {size / MIB / run.total_s:.1f} MiB/s (native upload"
            f" {run.upload_s:.2f} s, bridge part {run.bridge_s:.2f} s)"
        )
    if stack.tracebacks():
        print(f"bridge media: tracebacks in the bridge's log:\n{stack.log_tail()}")
    best = min(runs, key=lambda r: r.total_s)
    fastest_part = min(r.bridge_s for r in runs)
    limit = size / MIB / limit_s
    name = f"{size // MIB} MiB"
    return Results(
        [
            Figure(
                f"Synapse media upload {name}, direct",
                limit,
                "MiB/s",
                "- (the limit)",
                "itself",
                limit,
                decimals=1,
            ),
            Figure(
                f"bridge media native->Matrix {name}",
                size / MIB / best.total_s,
                "MiB/s",
                ">= 0.50 x limit",
                "Synapse direct upload",
                limit,
                decimals=1,
            ),
            Figure(
                f"bridge media {name}, bridge part only",
                size / MIB / fastest_part,
                "MiB/s",
                "-",
                "Synapse direct upload",
                limit,
                decimals=1,
            ),
        ]
    )


def run(quick: bool) -> Results:
    return run_on_stack("bridge-media", _measure, quick)
