"""Pacing, the part of :class:`~.core.ClientCore` that decides which frames go out now.

The outbox is one queue in request order; ``transmit`` walks it and hands out what the send
window (``window.py``) admits. Per room the order of the queue holds: nothing is sent past a
frame that still waits (for the window, a catch-up, the end of a RATE_LIMITED pause), nor past
a commit of ours in flight (it will move the epoch: what follows is encrypted once it is
merged), nor on a newer epoch than a frame in flight (that one will come back StaleEpoch and
go out again, behind), nor a frame of ours not saved yet (write-ahead: a commit, or a
message whose send mark is not saved yet), nor past any frame in
flight while the window restarts after a pause (so a refusal cannot let a later frame of the
room overtake the refused one). A message
encrypted on an epoch the room has left is re-encrypted first: a frame never goes out on
another epoch as it was built. Welcomes are not logged and go out independently of the order.

Within a room this keeps the order of the send calls, on one condition under a rate limit: the
frames in flight behind a refused one must reach the server before its retry_after ends (the
server refuses everything until then). A frame held up longer in the stream (a lossy link
retransmitting for seconds) may be taken while one sent before it was refused; it is still
stored once, and every member reads the log in the same order.

Requests outside the outbox that should share the window (media blocks, ``client/media.py``)
take their place with ``reserve`` and give it back with ``release``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import events as ev
from .room import NOT_COMMITS, ClientRoom, Pending
from .window import SendWindow


class Pacing:
    """Mixin of :class:`~.core.ClientCore` (the names below are the core's)."""

    if TYPE_CHECKING:
        connected: bool
        write_ahead: bool
        rooms: dict[bytes, ClientRoom]
        outbox: dict[int, Pending]
        window: SendWindow

        def _waiting_syncs(self, now: float) -> list[ev.Event]: ...

        def _encrypt(self, room: ClientRoom, pending: Pending, now: float) -> bytes: ...

        def _welcome_frame(self, room: ClientRoom, pending: Pending, now: float) -> bytes: ...

    def transmit(self, *, now: float) -> list[ev.Event]:
        """The frames of the outbox the send window admits now, in outbox order (and the syncs
        that waited for their turn or for the end of a RATE_LIMITED pause). The rules: this
        module's docstring."""
        window = self.window
        if not self.connected or window.paused(now):
            return []
        out = self._waiting_syncs(now)
        blocked: set[bytes] = set()  # rooms whose next frame must wait
        flying: dict[bytes, int] = {}  # room -> the oldest epoch of its frames in flight
        recovering = window.limit < window.max_frames
        for pending in list(self.outbox.values()):
            if window.frames >= window.limit:
                break
            welcome = pending.kind == "welcome"
            room_id = pending.room_id
            if pending.sent_size or pending.awaiting_sync:
                if not welcome and (pending.awaiting_sync or pending.kind not in NOT_COMMITS):
                    blocked.add(room_id)
                if not welcome and pending.sent_size:
                    flying[room_id] = min(flying.get(room_id, pending.epoch), pending.epoch)
                continue
            room = self.rooms.get(room_id)
            if room is None or (not welcome and (room_id in blocked or not room.active)):
                continue
            if pending.unsaved:  # a commit goes out once saved (write-ahead, see core.py)
                blocked.add(room_id)
                continue
            epoch = room.epoch if pending.kind == "message" else pending.epoch
            if not welcome and room_id in flying and (recovering or flying[room_id] < epoch):
                blocked.add(room_id)
                continue
            frame = pending.frame
            if welcome and frame is None:
                frame = self._welcome_frame(room, pending, now)
            elif pending.kind == "message" and (frame is None or pending.epoch != room.epoch):
                frame = self._encrypt(room, pending, now)
                if self.write_ahead:  # its send mark is saved first (``unsaved``: write-ahead)
                    blocked.add(room_id)
                    continue
            if frame is None:  # (not rebuilt yet: a catch-up will)
                blocked.add(room_id)
                continue
            if not window.admits(len(frame)):
                break
            window.sent(len(frame))
            pending.sent_size, pending.sent_at = len(frame), now
            out.append(ev.Outgoing(frame))
            if not welcome and pending.kind not in NOT_COMMITS:
                blocked.add(room_id)
        return out

    def resume_at(self, *, now: float) -> float | None:
        """When ``transmit`` should run again on its own (the end of a RATE_LIMITED pause),
        or None: every other change comes with an event that runs it."""
        if not self.connected or not self.window.paused(now):
            return None
        return self.window.not_before

    def held(self, request_id: int, within: float, *, now: float) -> bool:
        """Whether a request of the outbox is still held back on our side (queued behind the
        window, a pause or earlier frames) or was transmitted less than ``within`` ago."""
        pending = self.outbox.get(request_id)
        if pending is None or not self.connected:
            return False
        if pending.sent_at is None or self.window.paused(now):
            return True
        if not pending.sent_size and not pending.awaiting_sync:
            return True  # queued on our side
        return now - pending.sent_at < within

    def reserve(self, size: int, *, now: float) -> bool:
        """Take a place in the send window for a request outside the outbox of ``size`` bytes
        (its own, or its answer's if larger), if it may go out now: connected, not paused, and
        admitted. ``release`` gives the place back once the request is answered."""
        window = self.window
        if not self.connected or window.paused(now) or not window.admits(size):
            return False
        window.sent(size)
        return True

    def release(self, size: int, *, now: float) -> list[ev.Event]:
        """A request that ``reserve`` admitted is answered: its place is free, and what the
        window held back goes out (``transmit``)."""
        self.window.answered(size)
        return self.transmit(now=now)

    def _answered(self, pending: Pending, *, refused: bool = False) -> None:
        """The server answered the copy of ``pending`` in flight (or it left the outbox)."""
        if pending.sent_size:
            self.window.answered(pending.sent_size, refused=refused)
            pending.sent_size = 0
