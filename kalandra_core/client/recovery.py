"""Sync and epoch recovery, the part of :class:`~.core.ClientCore` that catches a room up.

Rules 3 and 4 of the epoch rules (core.py): a room is synced from the last log index it
applied when it is opened, on every reconnect, when a frame arrives ahead of a gap, and after a
StaleEpoch; once the log is applied, what waited for it (``Pending.awaiting_sync``) is queued
again, re-encrypted or rebuilt on the epoch the room has now, up to ``MAX_ATTEMPTS`` times.
Errors from the server are routed here too: a sync refused (we are no longer a member), a
request refused (StaleEpoch: recover; RATE_LIMITED: pause and send the same frame again; any
other: a ``Failed`` event).

At most ``SYNC_WINDOW`` syncs are in flight at once: the server answers one session's frames in
order, so a client catching up a thousand rooms after a (re)connect would otherwise put every
request of its own (a new room, a message, a commit) behind a thousand sync reads. The rest
wait in ``sync_waiting``, in order; a sync something is waiting for (a gap before a live
frame, a StaleEpoch, opening a room, a Welcome) goes first. Each room caught up since the
connection says so (``CaughtUp``); ``catching_up`` holds the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from ..mls.errors import GroupInactive, MlsError, WrongEpoch
from ..proto import (
    ErrorCode,
    ErrorPayload,
    Frame,
    Opcode,
    Payload,
    PayloadDecodeError,
    SyncRequest,
    SyncResponse,
    decode_payload,
)
from . import events as ev
from .room import ClientRoom, Pending
from .window import SendWindow

MAX_ATTEMPTS = 3
SYNC_PAGE = 500
# Syncs in flight at once: enough to keep the server busy (it answers them one by one), few
# enough that other requests wait behind little.
SYNC_WINDOW = 4


class SyncRecovery:
    """Mixin of :class:`~.core.ClientCore` (the names below are the core's)."""

    if TYPE_CHECKING:
        rooms: dict[bytes, ClientRoom]
        outbox: dict[int, Pending]
        sync_requests: dict[int, bytes]
        sync_waiting: OrderedDict[bytes, None]
        catching_up: set[bytes]
        window: SendWindow

        def build_frame(
            self,
            opcode: int,
            payload: Payload | bytes,
            *,
            now: float,
            room: ClientRoom | None = None,
            sign: bool = True,
        ) -> tuple[int, bytes]: ...

        def transmit(self, *, now: float) -> list[ev.Event]: ...

        def active_room(self, room_id: bytes) -> ClientRoom: ...

        def _apply(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]: ...

        def _leave(
            self, room: ClientRoom, reason: str, now: float, *, unseen: bool = False
        ) -> list[ev.Event]: ...

        def _encrypt(self, room: ClientRoom, pending: Pending, now: float) -> bytes: ...

        def _commit(self, pending: Pending, now: float) -> bytes: ...

        def _answered(self, pending: Pending, *, refused: bool = False) -> None: ...

    def _sync(self, room: ClientRoom, now: float, *, wanted: bool = True) -> list[ev.Event]:
        """Ask for the log after the last index we applied (a joiner: the commit that added
        it first), unless a sync of the room is on its way already. It waits its turn while
        ``SYNC_WINDOW`` syncs are in flight or a RATE_LIMITED pause lasts; ``wanted`` (not
        the catch-up of every room after a connect): something waits for it, so it goes
        first."""
        if not room.active:
            return []
        waiting = self.sync_waiting
        if room.syncing:
            if wanted and room.room_id in waiting:
                waiting.move_to_end(room.room_id, last=False)
            return []
        room.syncing = True
        if self.window.paused(now) or len(self.sync_requests) >= SYNC_WINDOW:
            waiting[room.room_id] = None  # sent by transmit when its turn comes
            if wanted:
                waiting.move_to_end(room.room_id, last=False)
            return []
        waiting.pop(room.room_id, None)
        return [self._sync_request(room, now)]

    def _waiting_syncs(self, now: float) -> list[ev.Event]:
        """The syncs that waited, as many as the window of syncs admits now."""
        out: list[ev.Event] = []
        waiting = self.sync_waiting
        while waiting and len(self.sync_requests) < SYNC_WINDOW:
            room = self.rooms.get(waiting.popitem(last=False)[0])
            if room is not None and room.active and room.syncing:
                out.append(self._sync_request(room, now))
        return out

    def _sync_request(self, room: ClientRoom, now: float) -> ev.Outgoing:
        if room.anchored:
            request = SyncRequest(from_log_index=room.last_seen + 1, limit=SYNC_PAGE)
        else:
            # A joiner first looks up the commit that added it; the log after it is ours.
            request = SyncRequest(
                from_log_index=0, limit=1, from_epoch=room.epoch - 1, to_epoch=room.epoch
            )
        rid, data = self.build_frame(Opcode.SYNC_REQUEST, request, room=room, sign=False, now=now)
        if not room.anchored:
            room.anchor_request = rid
        self.sync_requests[rid] = room.room_id
        return ev.Outgoing(data)

    def open_room(self, room_id: bytes, *, now: float) -> list[ev.Event]:
        """Rule 4: opening a room always syncs from the last applied log index."""
        room = self.active_room(room_id)
        room.syncing = False
        return self._sync(room, now) + self.transmit(now=now)

    def _sync_response(self, frame: Frame, room: ClientRoom | None, now: float) -> list[ev.Event]:
        self.sync_requests.pop(frame.header.request_id, None)
        if room is None or not room.active:
            return []
        if not room.anchored and frame.header.request_id != room.anchor_request:
            # An answer to an earlier sync of this room id (before we were removed and
            # re-added): its first frame is not the commit that added us this time.
            return []
        response = decode_payload(Opcode.SYNC_RESPONSE, frame.payload)
        assert isinstance(response, SyncResponse)
        room.syncing = False
        out: list[ev.Event] = []
        if not room.anchored:
            if not response.frames:
                return [ev.Undecryptable(room.room_id, -1, 0, "no commit found for our epoch")]
            anchor = Frame.decode(response.frames[0])
            room.last_seen = anchor.header.context_id
            room.anchored = True
            room.ahead = {i: f for i, f in room.ahead.items() if i > room.last_seen}
            return [ev.StateChanged(room.room_id), *self._sync(room, now)]
        for data in response.frames:
            try:
                inner = Frame.decode(data)
            except PayloadDecodeError:
                continue
            out += self._ordered_synced(room, inner, now)
            if room.left():  # the log showed our removal
                return out
        # Frames that arrived live before this page are applied by now (or predate our anchor).
        room.ahead = {i: f for i, f in room.ahead.items() if i > room.last_seen}
        if response.has_more or room.ahead:
            out += self._sync(room, now)
        else:
            out += self._retry_after_epoch(room, now, sync_done=True)
            if room.room_id in self.catching_up:
                self.catching_up.discard(room.room_id)
                out.append(ev.CaughtUp(room.room_id))
        return out

    def _ordered_synced(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        index = frame.header.context_id
        if index != room.last_seen + 1:
            return []
        out = self._apply(room, frame, now)
        room.ahead.pop(index, None)
        return out

    def _error(self, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        try:
            error = decode_payload(Opcode.ERROR, frame.payload)
        except PayloadDecodeError:
            error = ErrorPayload(code=int(ErrorCode.FRAME_REJECTED), message="(undecodable error)")
        assert isinstance(error, ErrorPayload)
        limited = error.code == ErrorCode.RATE_LIMITED
        if limited:
            # Not a failure: the session is over its rate. Nothing goes out before retry_after.
            self.window.rate_limited(now, float(error.retry_after or 1))
        synced = self.sync_requests.pop(h.request_id, None)
        if synced is not None and synced in self.rooms:
            room_synced = self.rooms[synced]
            if limited:  # asked again first, once the pause is over
                room_synced.syncing = False
                return self._sync(room_synced, now)
            room_synced.syncing = False
            if error.code in (ErrorCode.NOT_AUTHORIZED, ErrorCode.BANNED) and room_synced.active:
                # The server no longer lets us read the room: we were removed or banned.
                return self._leave(
                    room_synced, f"no longer a member ({error.message})", now, unseen=True
                )
            return [ev.Failed(h.request_id, synced, error.code, error.message)]
        pending = self.outbox.get(h.request_id)
        room = self.rooms.get(h.room_id_bytes) if h.room_id else None
        if pending is not None and room is None and not limited:
            self._answered(self.outbox.pop(h.request_id))  # (an answer naming no room of ours)
        if pending is None or room is None:
            if limited and pending is not None:
                self._answered(pending, refused=True)
                return []
            return [ev.Failed(h.request_id, h.room_id_bytes, error.code, error.message)]
        if limited:
            self._answered(pending, refused=True)  # queued again, the same frame
            return []
        if (
            error.code == ErrorCode.STALE_EPOCH
            and error.current_epoch is not None
            and pending.epoch >= error.current_epoch
        ):
            # It answers an older transmission (before a reconnect or a retry): the frame we
            # have sent since is built on an epoch at least as new. Rebuilding now would
            # discard a commit that may already be sequenced.
            return []
        self._answered(pending)
        if error.code == ErrorCode.STALE_EPOCH and pending.attempts < MAX_ATTEMPTS:
            if pending.kind != "message":
                room.group.discard_pending()
            pending.awaiting_sync = True
            pending.stale = True
            room.syncing = False
            return self._sync(room, now)
        del self.outbox[h.request_id]
        if pending.kind not in ("message", "moderation", "leave", "welcome"):
            room.group.discard_pending()
        return [ev.Failed(h.request_id, room.room_id, error.code, error.message)]

    def _retry_after_epoch(
        self, room: ClientRoom, now: float, *, sync_done: bool = False
    ) -> list[ev.Event]:
        """Queue again what waited for a catch-up, re-encrypted or rebuilt on the epoch we have
        now (``transmit`` sends it)."""
        if not sync_done:
            return []
        out: list[ev.Event] = []
        for pending in list(self.outbox.values()):
            if pending.room_id != room.room_id or not pending.awaiting_sync:
                continue
            pending.awaiting_sync = False
            stale = pending.stale
            if pending.stale:
                pending.attempts += 1
                pending.stale = False
            try:
                if pending.kind == "message":
                    self._encrypt(room, pending, now)
                elif pending.kind == "proposals" and not room.group.pending_proposals:
                    del self.outbox[pending.request_id]  # someone else committed them
                elif pending.kind in ("moderation", "leave"):
                    del self.outbox[pending.request_id]  # not rebuilt: the user may retry
                    out.append(ev.Failed(pending.request_id, room.room_id, 0, "not sent; retry"))
                elif (
                    not stale
                    and pending.frame is not None
                    and pending.epoch == room.epoch
                    and (room.group.has_pending_commit or self._resume(room, pending))
                ):
                    # Still valid (a reconnect or a restart, not a StaleEpoch): the same commit
                    # again. The server may hold the first copy still; a rebuilt one would
                    # differ from it.
                    pass
                else:
                    room.group.discard_pending()
                    self._commit(pending, now)
            except (MlsError, ValueError, GroupInactive, WrongEpoch) as exc:
                del self.outbox[pending.request_id]
                out.append(ev.Failed(pending.request_id, room.room_id, 0, str(exc)))
        return out

    @staticmethod
    def _resume(room: ClientRoom, pending: Pending) -> bool:
        """Give the group back the pending state of this commit of ours, saved with the outbox
        (after a restart, the room state may have been saved before the commit was made)."""
        return pending.mls is not None and room.group.resume_pending(pending.mls)
