"""The bot's client state in the bridge database, written so that no message is lost.

``Client`` calls ``state.save(core, rooms)`` synchronously, right after applying frames; this
object takes the place of ``kalandra_core.client.state.ClientState`` there. It snapshots what
changed at once and writes it on a writer task, in order, each batch in one transaction.

The rule that makes a restart lose nothing: a room's snapshot says "applied up to log index L",
and after a restart the client resyncs only what comes after L. Messages up to L were handed
to the portals before the snapshot was taken, but may not be bridged yet (Synapse is the slow
side), and once the group has moved on they cannot be decrypted again. So a room snapshot is
written only when every item of that room handed out before it (messages, commits, moderation,
failures: whatever the portal mirrors) has been bridged and recorded (:meth:`message_routed` /
:meth:`message_done` count them); until then it is parked,
and only the newest eligible snapshot is written. The outbox, the send marks (the generations
the client's encryptions used: a restored room state may be older than them) and KeyPackage
bundles are written right away.

So the saved state of a room may be older than the bot's own commits, which the log holds. The
outbox carries them: a commit of the bot's is written (its pending MLS state, with the outbox)
before it goes out (the client waits for :meth:`durable`), and stays in the written outbox
after it is merged until a room snapshot that includes it is written (``ClientCore.merged``,
pruned here in the same batch as that snapshot). A restart from the older snapshot replays the
log and merges the commit again instead of failing on it (a member cannot process its own
commit) and staying behind the room's epoch for good.

Tests only: ``KALANDRA_TEST_STATE_LAG`` (seconds) delays counting routed items done, so a test
can stop the bridge while a snapshot is parked, deterministically.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kalandra_core.client.core import ClientCore

from .db.client_state import ClientStateTable, bundles_blob, outbox_blob

log = logging.getLogger("kalandra.bridge.state")
_LAG = float(os.environ.get("KALANDRA_TEST_STATE_LAG", "0") or 0)  # tests only (see above)


@dataclass(slots=True)
class _Batch:
    rooms: dict[bytes, bytes | None] = field(default_factory=dict)
    bundles: bytes | None = None
    outbox: bytes | None = None
    marks: bytes | None = None

    def merge(self, other: _Batch) -> None:
        self.rooms.update(other.rooms)
        self.bundles = other.bundles if other.bundles is not None else self.bundles
        self.outbox = other.outbox if other.outbox is not None else self.outbox
        self.marks = other.marks if other.marks is not None else self.marks


class BotState:
    def __init__(self, table: ClientStateTable) -> None:
        self.table = table
        self._routed: defaultdict[bytes, int] = defaultdict(int)
        self._done: defaultdict[bytes, int] = defaultdict(int)
        # room -> [(messages routed when taken, state or None, its last applied log index)],
        # oldest first
        self._parked: defaultdict[bytes, list[tuple[int, bytes | None, int]]] = defaultdict(list)
        self._core: ClientCore | None = None
        self._pending = _Batch()
        self._wake = asyncio.Event()
        self._queued = 0  # batches queued so far
        self._written = 0  # of those, the ones written
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None

    # --- the barrier ---------------------------------------------------------------------------

    def message_routed(self, room_id: bytes) -> None:
        self._routed[room_id] += 1

    def message_done(self, room_id: bytes) -> None:
        """A routed message of this room is bridged and recorded (or deliberately skipped)."""
        if _LAG:
            asyncio.get_running_loop().call_later(_LAG, self._count_done, room_id)
        else:
            self._count_done(room_id)

    def _count_done(self, room_id: bytes) -> None:
        self._done[room_id] += 1
        parked = self._parked.get(room_id)
        if not parked:
            return
        done = self._done[room_id]
        ready = [entry for entry in parked if entry[0] <= done]
        if ready:
            self._parked[room_id] = [entry for entry in parked if entry[0] > done]
            _, snapshot, seen = ready[-1]
            batch = _Batch(rooms={room_id: snapshot})
            if self._core is not None and self._core.merged:
                # Our commits this snapshot includes leave the written outbox with it.
                self._core.forget_merged(room_id, seen)
                batch.outbox = outbox_blob(self._core)
            self._queue(batch)

    def room_released(self, room_id: bytes) -> None:
        """The room's portal is gone (unbridged): what was routed to it will never be bridged,
        so it counts as done and the room's snapshots are saved again."""
        for _ in range(self._routed[room_id] - self._done[room_id]):
            self.message_done(room_id)

    # --- what Client calls -----------------------------------------------------------------------

    def save(self, core: ClientCore, rooms: Iterable[bytes | None]) -> None:
        self._core = core
        batch = _Batch()
        for room_id in rooms:
            if room_id is None:
                batch.bundles = bundles_blob(core)
                continue
            room = core.rooms.get(room_id)
            snapshot = None if room is None else room.to_bytes()
            seen = (1 << 62) if room is None else room.last_seen
            routed = self._routed[room_id]
            if self._done[room_id] >= routed and not self._parked.get(room_id):
                batch.rooms[room_id] = snapshot
                core.forget_merged(room_id, seen)
            else:
                self._parked[room_id].append((routed, snapshot, seen))
        batch.outbox = outbox_blob(core)  # (after forget_merged: the same batch as the rooms)
        batch.marks = core.send_marks.to_bytes()  # written right away, like the outbox
        self._queue(batch)

    def save_all(self, core: ClientCore) -> None:
        self.save(core, [None, *core.rooms])

    # --- the writer ------------------------------------------------------------------------------

    def _queue(self, batch: _Batch) -> None:
        self._pending.merge(batch)
        self._queued += 1
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bot-state-writer")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending, taken = self._pending, _Batch(), self._queued
            while True:
                try:
                    await self.table.write(
                        batch.rooms, bundles=batch.bundles, outbox=batch.outbox, marks=batch.marks
                    )
                    break
                except Exception as exc:  # a busy database: retry, never drop state
                    log.warning("saving the bot's state failed (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(0.5)
                    batch.merge(self._pending)
                    self._pending, taken = _Batch(), self._queued
            async with self._progress:
                self._written = taken
                self._progress.notify_all()

    async def flush(self) -> None:
        """Wait until everything queued so far is written (not for later batches: a busy
        writer never keeps this waiting)."""
        target = self._queued
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target)

    async def durable(self) -> None:
        """(The client's write-ahead of its commits.)"""
        await self.flush()

    async def stop(self) -> None:
        await asyncio.wait_for(self.flush(), 10)
        if self._task is not None:
            self._task.cancel()
