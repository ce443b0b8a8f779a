"""Which frames of a client core's outbox go out now, and when a request counts as late.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import events as ev
from .room import NOT_COMMITS

if TYPE_CHECKING:
    from .core import ClientCore


def transmit(core: ClientCore) -> list[ev.Event]:
    now = core.clock()
    window = core.window
    if not core.connected or window.paused(now):
        return []
    out: list[ev.Event] = []
    for deferred in core.rooms.values():
        if deferred.sync_deferred:
            deferred.sync_deferred = deferred.syncing = False
            out += core._sync(deferred)
    blocked: set[bytes] = set()  # rooms whose next frame must wait
    flying: dict[bytes, int] = {}  # room -> the oldest epoch of its frames in flight
    recovering = window.limit < window.max_frames
    for pending in list(core.outbox.values()):
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
        room = core.rooms.get(room_id)
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
            frame = core._welcome_frame(room, pending)
        elif pending.kind == "message" and (frame is None or pending.epoch != room.epoch):
            frame = core._encrypt(room, pending)
            if core.write_ahead:  # its send mark is saved first (``unsaved``: write-ahead)
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


def held(core: ClientCore, request_id: int, within: float) -> bool:
    pending = core.outbox.get(request_id)
    if pending is None or not core.connected:
        return False
    now = core.clock()
    if pending.sent_at is None or core.window.paused(now):
        return True
    if not pending.sent_size and not pending.awaiting_sync:
        return True  # queued on our side
    return now - pending.sent_at < within
