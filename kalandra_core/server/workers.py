"""One asyncio task per active room: the single writer of that room's log.

Frames reach a room through its inbox in arrival order. The worker takes what is waiting (up to
``batch_max``), lets the sans-IO :class:`RoomSequencer` judge each, stores the accepted ones in
ONE transaction (group commit) and only then fans them out; every rejection becomes an Error
frame to its sender. A frame that changes the room (commit, moderation) closes its batch, so a
batch carries at most one set of room changes. If storage fails, the senders of the batch get a
STORAGE_ERROR and the sequencer is rebuilt from what is durably stored: nothing acknowledged is
lost and the log keeps no hole.

In cluster mode the worker exists only while its node holds the room's lease: every write
carries the lease's fencing token (``fence``), and a write the store refuses as
:class:`Fenced` (another node has taken the room) ends the worker at once; nothing of its
batch is acknowledged. What it had not answered (the rest of its batch and everything queued,
and what arrives until its batch under way is done) is handed back to the node (``on_moved``),
in arrival order, to be routed to the room's new owner: a refusal would let a member's later
frames, routed there meanwhile, be sequenced before it. A room handed over to another node
(rebalancing) is drained first: the worker sequences and answers what it has, then ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..backoff import Backoff
from ..mls.errors import InvalidMlsMessage
from ..mls.group import external_remove_proposal
from ..mls.server_view import inspect_group_info
from ..proto import ErrorCode, Frame, FrameHeader, Opcode, RawPayload, sign_header
from ..proto.payloads import GroupInfoData, decode_payload
from ..storage.base import Fenced, LogEntry, Role, RoomChanges, RoomMember, Store, StoreError
from . import replies
from .room import RECENT_REQUESTS, Accepted, Duplicate, Rejected, RoomSequencer

if TYPE_CHECKING:
    from nacl.signing import SigningKey

log = logging.getLogger("kalandra.server.room")
_RELOAD_RETRY, _RELOAD_RETRY_MAX = 0.1, 5.0  # seconds between reloads of an unanswering store
MOVED = "the room moved to another server; retry"


class Requester(Protocol):
    """Who sent a frame: the session that will get errors and replies."""

    member_id: int

    def send(self, frame: bytes) -> bool: ...


class Fanout(Protocol):
    def deliver(self, member_ids: frozenset[int] | set[int], frame: bytes) -> None: ...

    def deliver_once(self, member_id: int, frame: bytes) -> bool:
        """Send to the member's sessions; True if at least one took it."""
        ...


@dataclass(slots=True)
class _Item:
    frame: Frame
    requester: Requester | None  # None for frames the server itself writes


@dataclass(frozen=True, slots=True)
class Moved:
    """A frame a lost worker did not answer, for the node to route to the room's new owner."""

    frame: Frame
    requester: Requester


class RoomWorker:
    def __init__(
        self,
        room_id: bytes,
        sequencer: RoomSequencer,
        store: Store,
        fanout: Fanout,
        server_key: SigningKey,
        *,
        batch_max: int = 256,
        clock: Callable[[], float] = time.time,
        fence: int | None = None,
        on_lost: Callable[[RoomWorker], None] | None = None,
        on_moved: Callable[[RoomWorker, list[Moved]], None] | None = None,
    ) -> None:
        self.room_id = room_id
        self.fence = fence  # the lease's token (cluster mode), checked by every write
        self._on_lost = on_lost
        self._on_moved = on_moved
        self.lost = False
        self._moving: list[Moved] | None = []  # unanswered frames to hand back (None: done)
        self._done: set[int] = set()  # id() of the items of the batch under way answered
        self.sequencer = sequencer
        self._store = store
        self._fanout = fanout
        self._server_key = server_key
        self._batch_max = batch_max
        self._clock = clock
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a batch is under way
        self._closing = False  # being handed over: end once the inbox is empty
        self._server_sender_index: int | None = None
        # log index of the commit that moved the room out of each recent epoch
        self._commit_at: dict[int, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"room-{self.room_id.hex()}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, frame: Frame, requester: Requester | None) -> None:
        if self._moving is None:  # lost and handed back: straight on to the new owner
            self._moved(_Item(frame, requester))
            return
        self._inbox.put_nowait(_Item(frame, requester))

    async def drain(self) -> bool:
        """Sequence and answer everything submitted so far, then end the task (the caller
        submits nothing meanwhile). Whether the lease held throughout."""
        self._closing = True
        task = self._task
        if task is not None:
            if not self._busy and self._inbox.empty():
                task.cancel()  # idle, waiting for a frame
            await asyncio.wait([task])  # (a cancellation of the caller still reaches it)
        return not self.lost

    def resume(self) -> None:
        """After :meth:`drain`, the room stays here after all: take frames again."""
        self._closing = False
        if not self.lost:
            self.start()

    def lose(self) -> None:
        """The lease is gone (a renewal found it lost, or a write was fenced): sequence nothing
        more and end the task. A batch under way finishes (its writes are fenced, so it stores
        nothing if the room was really taken); until then frames still queue here, and then
        all that was not answered is handed back, in order (``on_moved``)."""
        if self.lost:
            return
        self.lost = True
        if self._task is not None and not self._busy:
            self._task.cancel()
        if self._on_lost is not None:
            self._on_lost(self)
        if not self._busy:
            self._hand_over()

    def _moved(self, item: _Item) -> None:
        """A frame this worker will not answer: handed back, in order, or refused (retry)."""
        if self._on_moved is None or item.requester is None:
            self._error(item, ErrorCode.STORAGE_ERROR, MOVED)
        elif self._moving is None:
            self._on_moved(self, [Moved(item.frame, item.requester)])
        else:
            self._moving.append(Moved(item.frame, item.requester))

    def _hand_over(self) -> None:
        """Once lost and its batch done: what it was given and did not answer, in order."""
        if self._moving is None or not self.lost:
            return
        while not self._inbox.empty():
            self._moved(self._inbox.get_nowait())
        moving, self._moving = self._moving, None
        if self._on_moved is not None:
            self._on_moved(self, moving)  # (also when empty: the node forgets this worker)

    @property
    def queued(self) -> int:
        return self._inbox.qsize()

    async def learn_server_sender(self) -> None:
        """Whether this group lets the server propose Removes (its key in external_senders)."""
        stored = await self._store.get_group_info(self.room_id)
        if stored is None:
            return
        try:
            summary = inspect_group_info(stored[1], verify=False)
        except InvalidMlsMessage:
            return
        key = bytes(self._server_key.verify_key)
        if key in summary.external_sender_keys:
            self._server_sender_index = summary.external_sender_keys.index(key)

    # --- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.lost:
            if self._closing and self._inbox.empty():
                return
            first = await self._inbox.get()
            batch = [first]
            while len(batch) < self._batch_max and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            self._busy = True
            self._done = set()
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Fenced:
                log.warning("room %s: lease lost to another node", self.room_id.hex())
                for item in batch:
                    if id(item) not in self._done:
                        self._moved(item)
                self.lose()
            except StoreError as exc:  # a read of the log (a duplicate's answer) met an outage
                log.error("room %s: read failed: %s", self.room_id.hex(), exc)
                for item in batch:
                    self._error(item, ErrorCode.STORAGE_ERROR, "could not read the log; retry")
                await self._reload()
            except Exception:
                log.exception("room %s: batch failed", self.room_id.hex())
                for item in batch:
                    self._error(item, ErrorCode.SEQUENCER_ERROR, "internal error")
                await self._reload()
            finally:
                self._busy = False
                self._hand_over()  # (if the lease went meanwhile)

    async def _process(self, batch: list[_Item]) -> None:
        pending: list[tuple[_Item, Accepted]] = []
        done = self._done
        for item in batch:
            if self.lost:  # fenced part-way: the rest is not ours to sequence
                self._moved(item)
                done.add(id(item))
                continue
            opcode = item.frame.header.opcode
            if opcode == Opcode.WELCOME:
                fenced = not await self._flush(pending)
                pending = []
                if fenced:
                    self._moved(item)
                    done.add(id(item))
                    continue
                await self._welcome(item)
                done.add(id(item))
                continue
            if opcode == Opcode.GROUP_INFO:
                fenced = not await self._flush(pending)
                pending = []
                if fenced:
                    self._moved(item)
                    done.add(id(item))
                    continue
                await self._group_info(item)
                done.add(id(item))
                continue
            decision = self.sequencer.submit(item.frame, int(self._clock() * 1000))
            if isinstance(decision, Duplicate):
                await self._flush(pending)
                pending = []
                await self._resend_stored(item, decision.log_index)
                done.add(id(item))
                continue
            if isinstance(decision, Rejected):
                await self._reject(item, decision)
                done.add(id(item))
                continue
            if decision.entry is None:  # ephemeral
                self._fanout.deliver(decision.recipients, decision.frame)
                done.add(id(item))
                continue
            pending.append((item, decision))
            if decision.changes is not None or decision.redact is not None:
                await self._flush(pending)
                pending = []
        await self._flush(pending)

    async def _flush(self, pending: list[tuple[_Item, Accepted]]) -> bool:
        """Store and fan out; False if the lease is gone (the frames were handed back)."""
        if self.lost:
            for item, _ in pending:
                self._moved(item)
                self._done.add(id(item))
            return False
        if not pending:
            return True
        done = self._done
        entries = [a.entry for _, a in pending if a.entry is not None]
        changes = pending[-1][1].changes  # only the last frame of a batch may carry changes
        try:
            await self._store.append(self.room_id, entries, changes, fence=self.fence)
        except Fenced:
            log.warning("room %s: append fenced: lease lost to another node", self.room_id.hex())
            for item, _ in pending:
                self._moved(item)
                done.add(id(item))
            self.lose()
            return False
        except StoreError as exc:
            log.error("room %s: append failed: %s", self.room_id.hex(), type(exc).__name__)
            for item, _ in pending:
                self._error(item, ErrorCode.STORAGE_ERROR, "could not store the frame; retry")
                done.add(id(item))
            await self._reload()
            return True
        for item, accepted in pending:
            self._fanout.deliver(accepted.recipients, accepted.frame)
            done.add(id(item))
        last = pending[-1][1]
        if last.changes is not None and last.changes.commit_log_index is not None:
            self._commit_at[self.sequencer.epoch - 1] = last.changes.commit_log_index
        if last.redact is not None:
            await self._store.redact(self.room_id, last.redact, fence=self.fence)
        if last.kicked:
            await self._propose_removals(last.kicked)
        return True

    async def _reload(self) -> None:
        """Rebuild the sequencer from what is durably stored. While the store does not answer
        (a database restarting), wait and try again: the in-memory sequencer may be ahead of
        the log, so nothing may be sequenced before this succeeds (frames wait in the inbox)."""
        backoff = Backoff(_RELOAD_RETRY, _RELOAD_RETRY_MAX)
        while True:
            try:
                state = await self._store.load_room(self.room_id)
                if state is not None:
                    self.sequencer = RoomSequencer(state)
                    await self.learn_recent_requests()
                return
            except StoreError as exc:
                log.warning("room %s: reload failed (%s); retrying", self.room_id.hex(), exc)
                await backoff.pause()

    async def learn_recent_requests(self) -> None:
        """Rebuild the resend filter from the end of the stored log (after a restart too)."""
        seq = self.sequencer
        start = max(0, seq.next_log_index - RECENT_REQUESTS)
        for stored in await self._store.load_frames(self.room_id, start, RECENT_REQUESTS):
            header = FrameHeader.parse(stored.header)
            seq.remember(header.sender_id, header.request_id, stored.log_index)

    async def _resend_stored(self, item: _Item, log_index: int) -> None:
        if item.requester is None:
            return
        stored = await self._store.load_frames(self.room_id, log_index, 1)
        if stored:
            item.requester.send(stored[0].encode())

    def _error(self, item: _Item, code: ErrorCode, message: str, **kw: int | None) -> None:
        if item.requester is not None:
            h = item.frame.header
            item.requester.send(
                replies.error(code, message, request_id=h.request_id, room_id=h.room_id, **kw)
            )

    async def _reject(self, item: _Item, decision: Rejected) -> None:
        log_index = None
        if decision.stale_epoch is not None:
            log_index = await self._commit_index(decision.stale_epoch)
        if item.requester is not None:
            h = item.frame.header
            item.requester.send(
                replies.error(
                    decision.code,
                    decision.message,
                    request_id=h.request_id,
                    room_id=h.room_id,
                    current_epoch=decision.current_epoch,
                    log_index=log_index,
                )
            )

    async def _commit_index(self, epoch: int) -> int | None:
        if epoch in self._commit_at:
            return self._commit_at[epoch]
        commits = await self._store.commits_between(self.room_id, epoch, epoch + 1)
        if not commits:
            return None
        self._commit_at[epoch] = commits[0].log_index
        return commits[0].log_index

    # --- server authority ---------------------------------------------------------------------

    async def _propose_removals(self, kicked: list[int]) -> None:
        """Kick/Ban in a group that lists the server as external sender: propose the MLS
        Remove, so any member can commit it and the member loses the group's keys."""
        if self._server_sender_index is None or not self.sequencer.group_id:
            return
        seq = self.sequencer
        entries: list[LogEntry] = []
        frames: list[bytes] = []
        for member_id in kicked:
            leaf = seq.leaf_of(member_id)
            if leaf is None:
                continue
            proposal = external_remove_proposal(
                group_id=seq.group_id,
                epoch=seq.epoch,
                sender_index=self._server_sender_index,
                removed_leaf=leaf,
                signing_key=bytes(self._server_key),
            )
            header = FrameHeader(
                Opcode.PROPOSAL, room_id=seq.room_id_int, sender_id=0, epoch=seq.epoch
            )
            frame = Frame.build(header, RawPayload(proposal))
            sign_header(frame.header, self._server_key)
            accepted = seq.server_proposal(frame)
            if accepted.entry is not None:
                entries.append(accepted.entry)
                frames.append(accepted.frame)
        if not entries:
            return
        try:
            await self._store.append(self.room_id, entries, None, fence=self.fence)
        except Fenced:
            self.lose()
            return
        except StoreError:
            await self._reload()
            return
        for frame_bytes in frames:
            self._fanout.deliver(seq.active_members(), frame_bytes)

    # --- Welcome and GroupInfo ----------------------------------------------------------------

    async def _welcome(self, item: _Item) -> None:
        """Route a Welcome to its recipient (context_id) through the mailbox; never broadcast."""
        h = item.frame.header
        seq = self.sequencer
        recipient = h.context_id
        if not seq.is_member(h.sender_id) and not await self._committed(h.sender_id, h.epoch):
            self._error(item, ErrorCode.NOT_AUTHORIZED, "not a member of this room")
            return
        if seq.is_banned(recipient, int(self._clock() * 1000)):
            self._error(item, ErrorCode.BANNED, "the recipient is banned from this room")
            return
        if await self._store.get_member(recipient) is None:
            self._error(item, ErrorCode.MEMBER_NOT_FOUND, "no such member")
            return
        if not seq.is_member(recipient):
            if seq.handshake.value == "public":
                self._error(
                    item, ErrorCode.MEMBER_NOT_FOUND, "no sequenced commit added this member"
                )
                return
            # Private handshakes: the Welcome is how the server learns of the add.
            member = RoomMember(recipient, Role.MEMBER, None)
            await self._store.append(
                self.room_id, [], RoomChanges(upsert_members=[member]), fence=self.fence
            )
            seq.members[recipient] = member
        frame = item.frame.encode()
        # Kept in the mailbox until the recipient syncs the room (it then has joined).
        await self._store.put_welcome(self.room_id, recipient, frame, fence=self.fence)
        self._fanout.deliver_once(recipient, frame)
        if item.requester is not None:
            # The receipt (empty payload, the request id echoed): the sender may forget it.
            item.requester.send(
                replies.answer(h, Opcode.WELCOME, context_id=recipient, epoch=h.epoch)
            )

    async def _committed(self, sender: int, epoch: int) -> bool:
        """Whether ``sender`` wrote the commit that created ``epoch``: the Welcomes of that
        commit are its to deliver, even if it has been removed since (its Welcome may arrive
        after its removal; nobody else can send it)."""
        if epoch < 1:
            return False
        commits = await self._store.commits_between(self.room_id, epoch - 1, epoch)
        return bool(commits) and commits[0].sender_id == sender

    async def _group_info(self, item: _Item) -> None:
        """A member publishes the current GroupInfo (for external joins), or, with an empty
        payload, fetches the latest one (to rejoin by external commit)."""
        h = item.frame.header
        seq = self.sequencer
        if not seq.is_member(h.sender_id):
            self._error(item, ErrorCode.NOT_AUTHORIZED, "not a member of this room")
            return
        if not item.frame.payload:
            stored = await self._store.get_group_info(self.room_id)
            if stored is None:
                self._error(item, ErrorCode.MESSAGE_NOT_FOUND, "no GroupInfo published yet")
            elif item.requester is not None:
                item.requester.send(
                    replies.answer(h, Opcode.GROUP_INFO, RawPayload(stored[1]), epoch=stored[0])
                )
            return
        try:
            payload = decode_payload(h.opcode, item.frame.payload)
            data = payload.group_info if isinstance(payload, GroupInfoData) else item.frame.payload
            summary = inspect_group_info(data)
        except (InvalidMlsMessage, ValueError) as exc:
            self._error(item, ErrorCode.INVALID_PAYLOAD, str(exc))
            return
        if summary.group_id != seq.group_id or summary.epoch != seq.epoch:
            self._error(
                item,
                ErrorCode.INVALID_EPOCH,
                "GroupInfo is not of the room's current epoch",
                current_epoch=seq.epoch,
            )
            return
        await self._store.put_group_info(self.room_id, summary.epoch, data, fence=self.fence)
        if item.requester is not None:
            item.requester.send(replies.answer(h, Opcode.GROUP_INFO, epoch=seq.epoch))
