"""The sequencer of one room, sans-IO: validate a frame, then give it the next log index.

``RoomSequencer.submit`` decides, for one frame from an authenticated member whose frame
signature the session already checked, whether the room takes it, and if so what it changes:
the log entry (header with the log index written into context_id), the epoch move of a Commit,
roster changes it can follow (public handshakes), bans, redactions. State moves forward at once
so the next frame of a batch is judged against it; the driver persists the batch in one
transaction and, if that fails, rebuilds the sequencer from storage. Nothing is ever numbered
that was not validated, so the log has no holes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

from ..mls.errors import InvalidMlsMessage
from ..mls.server_view import HandshakeSummary, inspect_handshake
from ..proto import (
    Ban,
    ErrorCode,
    Frame,
    Handshake,
    Kick,
    Opcode,
    PayloadDecodeError,
    Redact,
    Unban,
    check_payload,
    decode_payload,
)
from ..storage.base import BanRecord, LogEntry, Role, RoomChanges, RoomMember, RoomState

# Frames that go into the log at the room's current epoch.
SEQUENCED_APP: Final = frozenset(
    {
        Opcode.APP_MESSAGE,
        Opcode.APP_RECEIPT,
        Opcode.APP_REACTION,
        Opcode.APP_EDIT,
        Opcode.APP_DELETE,
    }
)
# Delivered to the room's sessions but never stored (no log index).
EPHEMERAL: Final = frozenset({Opcode.TYPING, Opcode.PRESENCE})
MODERATION: Final = frozenset({Opcode.KICK, Opcode.BAN, Opcode.UNBAN, Opcode.REDACT})
# (sender, request id) pairs remembered per room, to answer resends instead of re-sequencing.
RECENT_REQUESTS: Final = 4096


@dataclass(frozen=True, slots=True)
class Rejected:
    code: int
    message: str
    current_epoch: int | None = None
    stale_epoch: int | None = None  # StaleEpoch: the frame's epoch (its commit's log index
    # is looked up by the driver)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A resend of a frame already in the log (same sender and request id): answer it with the
    stored frame instead of numbering it twice."""

    log_index: int


@dataclass(slots=True)
class Accepted:
    entry: LogEntry | None  # None for ephemeral frames
    frame: bytes  # what to broadcast (with the log index written in)
    recipients: frozenset[int]  # member ids to deliver to
    changes: RoomChanges | None = None
    redact: int | None = None  # log index whose payload to delete after the append
    kicked: list[int] = field(default_factory=list)  # for server Remove proposals


class _Roster(dict[int, RoomMember]):
    """A room's members by id, remembering who of them is active (delivered to) until the
    roster changes: every sequenced frame needs that set, and building it is O(members)."""

    __slots__ = ("active",)

    def __init__(self, members: dict[int, RoomMember]) -> None:
        super().__init__(members)
        self.active: frozenset[int] | None = None

    def __setitem__(self, key: int, value: RoomMember) -> None:
        self.active = None
        super().__setitem__(key, value)

    def __delitem__(self, key: int) -> None:
        self.active = None
        super().__delitem__(key)

    def pop(self, key: int, *default: Any) -> Any:
        self.active = None
        return super().pop(key, *default)

    def popitem(self) -> tuple[int, RoomMember]:
        self.active = None
        return super().popitem()

    def clear(self) -> None:
        self.active = None
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.active = None
        super().update(*args, **kwargs)

    def setdefault(self, key: int, default: Any = None) -> Any:
        self.active = None
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> _Roster:  # type: ignore[override,misc]
        self.active = None
        super().update(other)
        return self


def _reject(code: ErrorCode, message: str, **kw: int | None) -> Rejected:
    return Rejected(int(code), message, **kw)


class RoomSequencer:
    def __init__(self, state: RoomState) -> None:
        room = state.room
        self.room_id = room.room_id
        self.room_id_int = int.from_bytes(room.room_id, "big")
        self.epoch = room.epoch
        self.next_log_index = room.next_log_index
        self.handshake = room.handshake
        self.group_id = room.group_id
        self.members: dict[int, RoomMember] = _Roster(state.members)
        self.bans: dict[int, BanRecord] = dict(state.bans)
        # Remove proposals sequenced this epoch, by reference: commits may cite them.
        self.proposal_removes: dict[bytes, int] = {}
        self.recent: OrderedDict[tuple[int, int], int] = OrderedDict()

    def remember(self, sender_id: int, request_id: int, log_index: int) -> None:
        """Record a sequenced frame's (sender, request id); request id 0 means "none"."""
        if request_id:
            self.recent[(sender_id, request_id)] = log_index
            if len(self.recent) > RECENT_REQUESTS:
                self.recent.popitem(last=False)

    # --- queries --------------------------------------------------------------------------

    def is_member(self, member_id: int) -> bool:
        m = self.members.get(member_id)
        return m is not None and m.role >= Role.MEMBER

    def active_members(self) -> frozenset[int]:
        members = self.members
        if isinstance(members, _Roster) and members.active is not None:
            return members.active
        active = frozenset(i for i, m in members.items() if m.role >= Role.MEMBER)
        if isinstance(members, _Roster):
            members.active = active
        return active

    def is_banned(self, member_id: int, now_ms: int) -> bool:
        ban = self.bans.get(member_id)
        return ban is not None and (ban.expires_at is None or ban.expires_at > now_ms)

    def leaf_of(self, member_id: int) -> int | None:
        m = self.members.get(member_id)
        return None if m is None else m.leaf_index

    # --- the decision -----------------------------------------------------------------------

    def submit(self, frame: Frame, now_ms: int) -> Accepted | Rejected | Duplicate:
        h = frame.header
        sender = h.sender_id
        opcode = h.opcode
        if h.request_id and (sender, h.request_id) in self.recent and opcode not in EPHEMERAL:
            return Duplicate(self.recent[(sender, h.request_id)])
        if self.is_banned(sender, now_ms):
            return _reject(ErrorCode.BANNED, "you are banned from this room")
        if not self.is_member(sender):
            return _reject(ErrorCode.NOT_AUTHORIZED, "not a member of this room")
        if opcode in EPHEMERAL:
            return Accepted(None, frame.encode(), self.active_members())
        if h.epoch != self.epoch:
            return self._wrong_epoch(h.epoch)
        if opcode in SEQUENCED_APP:
            try:
                check_payload(opcode, frame.payload)
            except PayloadDecodeError as exc:
                return _reject(ErrorCode.INVALID_PAYLOAD, str(exc))
            return self._sequence(frame, self.active_members())
        if opcode == Opcode.COMMIT:
            return self._commit(frame)
        if opcode == Opcode.PROPOSAL:
            return self._proposal(frame)
        if opcode in MODERATION:
            return self._moderate(frame, now_ms)
        return _reject(ErrorCode.FRAME_REJECTED, f"{h.opcode_name} frames are not room frames")

    def _wrong_epoch(self, epoch: int) -> Rejected:
        if epoch < self.epoch:
            return _reject(
                ErrorCode.STALE_EPOCH,
                f"stale epoch {epoch}: the room is at epoch {self.epoch}",
                current_epoch=self.epoch,
                stale_epoch=epoch,
            )
        return _reject(
            ErrorCode.FUTURE_EPOCH,
            f"future epoch {epoch}: the room is at epoch {self.epoch}",
            current_epoch=self.epoch,
        )

    def _sequence(
        self,
        frame: Frame,
        recipients: frozenset[int],
        changes: RoomChanges | None = None,
    ) -> Accepted:
        index = self.next_log_index
        header = frame.header
        raw = header.with_context_id(index)
        self.next_log_index = index + 1
        sender = header.sender_id
        self.remember(sender, header.request_id, index)
        payload = frame.payload
        entry = LogEntry(index, header.opcode, sender, header.epoch, raw, payload)
        return Accepted(entry, raw + payload, recipients, changes)

    def server_proposal(self, frame: Frame) -> Accepted:
        """Sequence a proposal the server itself wrote (external-sender Remove)."""
        summary = inspect_handshake(frame.payload)
        if summary.proposal_ref is not None and summary.proposal_remove is not None:
            self.proposal_removes[summary.proposal_ref] = summary.proposal_remove
        return self._sequence(frame, self.active_members())

    # --- MLS handshakes ----------------------------------------------------------------------

    def _summary(self, frame: Frame) -> HandshakeSummary | Rejected:
        try:
            summary = inspect_handshake(frame.payload)
        except InvalidMlsMessage as exc:
            return _reject(ErrorCode.INVALID_PAYLOAD, str(exc))
        if summary.group_id != self.group_id:
            return _reject(ErrorCode.INVALID_COMMIT, "MLS message is for another group")
        if summary.epoch != frame.header.epoch:
            return _reject(ErrorCode.INVALID_EPOCH, "frame epoch and MLS epoch differ")
        if self.handshake is Handshake.PUBLIC and summary.private:
            return _reject(
                ErrorCode.INVALID_COMMIT, "this room takes handshakes as PublicMessage only"
            )
        return summary

    def _proposal(self, frame: Frame) -> Accepted | Rejected:
        summary = self._summary(frame)
        if isinstance(summary, Rejected):
            return summary
        if summary.proposal_ref is not None and summary.proposal_remove is not None:
            self.proposal_removes[summary.proposal_ref] = summary.proposal_remove
        return self._sequence(frame, self.active_members())

    def _commit(self, frame: Frame) -> Accepted | Rejected:
        summary = self._summary(frame)
        if isinstance(summary, Rejected):
            return summary
        sender = frame.header.sender_id
        changes = RoomChanges(new_epoch=self.epoch + 1)
        before = self.active_members()
        if not summary.private:
            planned = self._membership(summary, sender)
            if isinstance(planned, Rejected):
                return planned
            changes.upsert_members, changes.remove_members = planned
        accepted = self._sequence(frame, before, changes)
        changes.commit_log_index = accepted.entry.log_index if accepted.entry else None
        for member_id in changes.remove_members:
            self.members.pop(member_id, None)
        for member in changes.upsert_members:
            self.members[member.member_id] = member
        accepted.recipients = before | self.active_members()
        self.epoch += 1
        self.proposal_removes.clear()
        return accepted

    def _membership(
        self, summary: HandshakeSummary, sender: int
    ) -> tuple[list[RoomMember], list[int]] | Rejected:
        """Roster changes of a public commit: Removes, then Adds at the leftmost free leaves."""
        by_leaf = {
            m.leaf_index: m.member_id for m in self.members.values() if m.leaf_index is not None
        }
        if summary.sender_type == "member":
            if summary.sender_leaf is None or by_leaf.get(summary.sender_leaf) != sender:
                return _reject(ErrorCode.INVALID_COMMIT, "committer leaf is not the sender's")
        elif summary.sender_type == "new_member_commit":
            pass  # rejoin by external commit: the sender is a member already (checked above)
        else:
            return _reject(ErrorCode.INVALID_COMMIT, f"commit from a {summary.sender_type}")
        removed_leaves = set(summary.removes)
        for ref in summary.references:
            leaf = self.proposal_removes.get(ref)
            if leaf is not None:
                removed_leaves.add(leaf)
        removed = [by_leaf[leaf] for leaf in sorted(removed_leaves) if leaf in by_leaf]
        occupied = set(by_leaf) - removed_leaves
        upserts: list[RoomMember] = []

        def take_leaf() -> int:
            leaf = 0
            while leaf in occupied:
                leaf += 1
            occupied.add(leaf)
            return leaf

        for joiner in summary.adds:
            if joiner.member_id in self.bans:
                return _reject(ErrorCode.BANNED, f"member {joiner.member_id} is banned")
            if joiner.member_id in self.members and joiner.member_id not in removed:
                return _reject(ErrorCode.ALREADY_EXISTS, f"{joiner.member_id} is a member")
            upserts.append(RoomMember(joiner.member_id, Role.MEMBER, take_leaf()))
        if summary.sender_type == "new_member_commit":
            # The external joiner (a member resyncing) takes a fresh leaf too.
            old = self.members[sender]
            if old.leaf_index is not None and old.leaf_index not in removed_leaves:
                occupied.discard(old.leaf_index)
                removed_leaves.add(old.leaf_index)
            upserts.append(RoomMember(sender, old.role, take_leaf()))
        # Removed members keep no role; a re-added member starts as a plain member.
        still_removed = [m for m in removed if m not in {u.member_id for u in upserts}]
        return upserts, still_removed

    # --- moderation --------------------------------------------------------------------------

    def _moderate(self, frame: Frame, now_ms: int) -> Accepted | Rejected:
        h = frame.header
        try:
            payload = decode_payload(h.opcode, frame.payload)
        except PayloadDecodeError as exc:
            return _reject(ErrorCode.INVALID_PAYLOAD, str(exc))
        moderator = self.members[h.sender_id]
        if moderator.role < Role.MODERATOR:
            return _reject(ErrorCode.NOT_AUTHORIZED, "moderator or owner role required")
        if isinstance(payload, Redact):
            if not payload.message_log_index < self.next_log_index:
                return _reject(ErrorCode.MESSAGE_NOT_FOUND, "no such log index")
            accepted = self._sequence(frame, self.active_members())
            accepted.redact = payload.message_log_index
            return accepted
        assert isinstance(payload, Kick | Ban | Unban)
        if payload.moderator_id != h.sender_id:
            return _reject(ErrorCode.NOT_AUTHORIZED, "moderator_id must be the sender")
        target = payload.user_id
        target_role = self.members[target].role if target in self.members else Role.MEMBER
        if target == h.sender_id or target_role >= moderator.role:
            return _reject(ErrorCode.NOT_AUTHORIZED, "cannot moderate an equal or higher role")
        changes = RoomChanges()
        recipients = self.active_members()
        kicked: list[int] = []
        if isinstance(payload, Unban):
            if target not in self.bans:
                return _reject(ErrorCode.MEMBER_NOT_FOUND, "member is not banned")
            changes.lift_bans.append(target)
            self.bans.pop(target)
        else:
            if isinstance(payload, Kick) and not self.is_member(target):
                return _reject(ErrorCode.MEMBER_NOT_FOUND, "not a member of this room")
            if isinstance(payload, Ban):
                expires = None
                if payload.duration_secs is not None:
                    expires = now_ms + payload.duration_secs * 1000
                ban = BanRecord(target, h.sender_id, payload.reason, expires)
                changes.set_bans.append(ban)
                self.bans[target] = ban
            if self.is_member(target):
                # Out for the server now; its leaf stays tracked until a commit removes it.
                out = RoomMember(target, Role.REMOVED, self.members[target].leaf_index)
                changes.upsert_members.append(out)
                self.members[target] = out
                kicked.append(target)
        accepted = self._sequence(frame, recipients, changes)
        accepted.kicked = kicked
        return accepted
