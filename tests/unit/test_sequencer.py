"""The sans-IO room sequencer: validation before numbering, epochs, rosters, moderation."""

from __future__ import annotations

import itertools
import os

import pytest

from kalandra_core.crypto import SenderKeyStore
from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import build_key_package
from kalandra_core.proto import (
    Ban,
    ErrorCode,
    Frame,
    FrameHeader,
    Handshake,
    Kick,
    Opcode,
    RawPayload,
    Redact,
    Unban,
)
from kalandra_core.server.room import Accepted, Duplicate, Rejected, RoomSequencer
from kalandra_core.storage.base import Role, Room, RoomMember, RoomState

ROOM = bytes(range(16))
NOW = 1_700_000_000_000
A, B, C, D = 11, 22, 33, 44


_request_ids = itertools.count(1)


def frame(
    opcode: int, sender: int, epoch: int, payload: bytes = b"", request_id: int | None = None
) -> Frame:
    header = FrameHeader(
        opcode,
        room_id=int.from_bytes(ROOM, "big"),
        sender_id=sender,
        epoch=epoch,
        request_id=next(_request_ids) if request_id is None else request_id,
    )
    return Frame.build(header, payload)


class World:
    """A real MLS group of A (owner), B and C, and a sequencer that knows the same roster."""

    def __init__(self, handshake: Handshake = Handshake.PUBLIC) -> None:
        self.keys = {m: os.urandom(32) for m in (A, B, C, D)}
        mls_mode = Handshake(handshake.value)
        self.a = MlsGroup.create(A, self.keys[A], handshake=mls_mode)
        kb, kc = build_key_package(B, self.keys[B]), build_key_package(C, self.keys[C])
        out = self.a.add([kb.key_package, kc.key_package])
        self.a.process(out.commit)
        self.b = MlsGroup.join(out.welcomes[B], kb, handshake=mls_mode)
        self.c = MlsGroup.join(out.welcomes[C], kc, handshake=mls_mode)
        room = Room(
            room_id=ROOM,
            epoch=1,
            next_log_index=1,
            creator=A,
            created_at=NOW,
            handshake=handshake,
            group_id=self.a.group_id,
        )
        members = {
            A: RoomMember(A, Role.OWNER, 0),
            B: RoomMember(B, Role.MEMBER, 1),
            C: RoomMember(C, Role.MEMBER, 2),
        }
        self.seq = RoomSequencer(RoomState(room, members, {}))

    def message(self, group: MlsGroup, sender: int, epoch: int | None = None) -> Frame:
        store = SenderKeyStore(
            epoch=group.epoch,
            epoch_secret=group.sender_key_secret(),
            own_index=group.own_leaf_index,
            member_indices={m.leaf_index for m in group.members()},
        )
        envelope = store.encrypt(b"hello")
        return frame(
            Opcode.APP_MESSAGE, sender, group.epoch if epoch is None else epoch, envelope.encode()
        )

    def commit(self, group: MlsGroup, sender: int, data: bytes) -> Frame:
        return frame(Opcode.COMMIT, sender, group.epoch, data)


def accepted(decision: Accepted | Rejected | Duplicate) -> Accepted:
    assert isinstance(decision, Accepted), decision
    return decision


def rejected(decision: Accepted | Rejected | Duplicate, code: ErrorCode) -> Rejected:
    assert isinstance(decision, Rejected), decision
    assert decision.code == code, decision
    return decision


def test_app_message_gets_the_next_dense_log_index() -> None:
    w = World()
    first = accepted(w.seq.submit(w.message(w.b, B), NOW))
    second = accepted(w.seq.submit(w.message(w.c, C), NOW))
    assert first.entry is not None
    assert second.entry is not None
    assert (first.entry.log_index, second.entry.log_index) == (1, 2)
    assert Frame.decode(first.frame).header.context_id == 1
    assert first.recipients == {A, B, C}


def test_epoch_is_enforced_with_the_current_epoch_in_the_error() -> None:
    w = World()
    future = rejected(w.seq.submit(w.message(w.b, B, epoch=99), NOW), ErrorCode.FUTURE_EPOCH)
    assert future.current_epoch == 1
    stale = rejected(w.seq.submit(w.message(w.b, B, epoch=0), NOW), ErrorCode.STALE_EPOCH)
    assert (stale.current_epoch, stale.stale_epoch) == (1, 0)
    assert w.seq.next_log_index == 1  # nothing numbered


def test_non_members_banned_and_garbage_are_refused() -> None:
    w = World()
    rejected(w.seq.submit(frame(Opcode.APP_MESSAGE, D, 1, b"\xa0"), NOW), ErrorCode.NOT_AUTHORIZED)
    rejected(
        w.seq.submit(frame(Opcode.APP_MESSAGE, B, 1, b"junk"), NOW), ErrorCode.INVALID_PAYLOAD
    )
    rejected(w.seq.submit(frame(Opcode.HELLO, B, 1), NOW), ErrorCode.FRAME_REJECTED)
    assert w.seq.next_log_index == 1


def test_commit_moves_the_epoch_and_the_loser_learns_the_winner() -> None:
    w = World()
    mine = w.b.self_update()
    theirs = w.c.self_update()
    win = accepted(w.seq.submit(w.commit(w.b, B, mine.commit), NOW))
    assert win.changes is not None
    assert (win.changes.new_epoch, win.changes.commit_log_index) == (2, 1)
    assert w.seq.epoch == 2
    lose = rejected(w.seq.submit(w.commit(w.c, C, theirs.commit), NOW), ErrorCode.STALE_EPOCH)
    assert (lose.current_epoch, lose.stale_epoch) == (2, 1)
    # An app message still labelled with the old epoch is stale now too.
    rejected(w.seq.submit(w.message(w.c, C), NOW), ErrorCode.STALE_EPOCH)


def test_public_commits_keep_the_roster() -> None:
    w = World()
    kd = build_key_package(D, w.keys[D])
    out = w.a.add([kd.key_package])
    decision = accepted(w.seq.submit(w.commit(w.a, A, out.commit), NOW))
    assert decision.changes is not None
    assert [(m.member_id, m.leaf_index) for m in decision.changes.upsert_members] == [(D, 3)]
    assert w.seq.is_member(D)
    w.a.process(out.commit)
    for g in (w.b, w.c):
        g.process(out.commit)
    removal = w.a.remove([B])
    decision = accepted(w.seq.submit(w.commit(w.a, A, removal.commit), NOW))
    assert decision.changes is not None
    assert decision.changes.remove_members == [B]
    assert B in decision.recipients  # the removed member learns of it
    assert not w.seq.is_member(B)


def test_commit_must_come_from_the_senders_leaf_and_this_group() -> None:
    w = World()
    out = w.b.self_update()
    rejected(w.seq.submit(w.commit(w.b, C, out.commit), NOW), ErrorCode.INVALID_COMMIT)
    other = MlsGroup.create(C, w.keys[C])
    foreign = other.self_update()
    rejected(
        w.seq.submit(frame(Opcode.COMMIT, C, 1, foreign.commit), NOW), ErrorCode.INVALID_COMMIT
    )
    # The MLS epoch inside must be the frame's.
    mislabelled = w.c.self_update()
    rejected(
        w.seq.submit(frame(Opcode.COMMIT, C, 2, mislabelled.commit), NOW), ErrorCode.FUTURE_EPOCH
    )
    rejected(
        w.seq.submit(frame(Opcode.COMMIT, C, 1, b"\x00\x01zz"), NOW), ErrorCode.INVALID_PAYLOAD
    )
    assert w.seq.epoch == 1


def test_a_banned_member_cannot_be_added_back() -> None:
    w = World()
    ban = Ban(user_id=C, reason="spam", moderator_id=A)
    accepted(w.seq.submit(frame(Opcode.BAN, A, 1, ban.encode()), NOW))
    assert w.seq.is_banned(C, NOW)
    assert not w.seq.is_member(C)
    assert w.seq.members[C].role is Role.REMOVED  # leaf still tracked until a commit
    rejected(w.seq.submit(w.message(w.c, C), NOW), ErrorCode.BANNED)
    # A commit re-adding C is refused while the ban holds.
    removal = w.a.remove([C])
    accepted(w.seq.submit(w.commit(w.a, A, removal.commit), NOW))
    w.a.process(removal.commit)
    w.b.process(removal.commit)
    readd = w.a.add([build_key_package(C, w.keys[C]).key_package])
    rejected(w.seq.submit(w.commit(w.a, A, readd.commit), NOW), ErrorCode.BANNED)
    unban = Unban(user_id=C, moderator_id=A)
    accepted(w.seq.submit(frame(Opcode.UNBAN, A, 2, unban.encode()), NOW))
    accepted(w.seq.submit(w.commit(w.a, A, readd.commit), NOW))
    assert w.seq.is_member(C)


def test_temporary_bans_expire() -> None:
    w = World()
    ban = Ban(user_id=C, reason="cool off", duration_secs=60, moderator_id=A)
    accepted(w.seq.submit(frame(Opcode.BAN, A, 1, ban.encode()), NOW))
    assert w.seq.is_banned(C, NOW + 59_000)
    assert not w.seq.is_banned(C, NOW + 61_000)


def test_moderation_needs_a_higher_role() -> None:
    w = World()
    kick = Kick(user_id=C, reason="x", moderator_id=B)
    rejected(w.seq.submit(frame(Opcode.KICK, B, 1, kick.encode()), NOW), ErrorCode.NOT_AUTHORIZED)
    forged = Kick(user_id=C, reason="x", moderator_id=B)
    rejected(
        w.seq.submit(frame(Opcode.KICK, A, 1, forged.encode()), NOW), ErrorCode.NOT_AUTHORIZED
    )
    kick_owner = Kick(user_id=A, reason="x", moderator_id=A)
    rejected(
        w.seq.submit(frame(Opcode.KICK, A, 1, kick_owner.encode()), NOW), ErrorCode.NOT_AUTHORIZED
    )
    ok = accepted(
        w.seq.submit(
            frame(Opcode.KICK, A, 1, Kick(user_id=C, reason="bye", moderator_id=A).encode()), NOW
        )
    )
    assert ok.kicked == [C]
    assert C in ok.recipients


def test_redaction() -> None:
    w = World()
    accepted(w.seq.submit(w.message(w.b, B), NOW))
    redact = Redact(message_log_index=1, reason="oops", moderator_id=A)
    decision = accepted(w.seq.submit(frame(Opcode.REDACT, A, 1, redact.encode()), NOW))
    assert decision.redact == 1
    missing = Redact(message_log_index=50, reason="?", moderator_id=A)
    rejected(
        w.seq.submit(frame(Opcode.REDACT, A, 1, missing.encode()), NOW),
        ErrorCode.MESSAGE_NOT_FOUND,
    )


def test_proposals_by_reference_remove_members() -> None:
    w = World()
    leave = w.c.propose_leave()
    accepted(w.seq.submit(frame(Opcode.PROPOSAL, C, 1, leave), NOW))
    for g in (w.a, w.b, w.c):
        g.process(leave)
    commit = w.b.commit_pending_proposals()
    decision = accepted(w.seq.submit(w.commit(w.b, B, commit.commit), NOW))
    assert decision.changes is not None
    assert decision.changes.remove_members == [C]


def test_private_handshake_rooms() -> None:
    w = World(Handshake.PRIVATE)
    out = w.b.self_update()
    assert out.commit[2:4] == b"\x00\x02"
    decision = accepted(w.seq.submit(w.commit(w.b, B, out.commit), NOW))
    assert decision.changes is not None
    assert decision.changes.upsert_members == []  # nothing the server can follow
    assert w.seq.epoch == 2


def test_public_rooms_refuse_private_handshakes() -> None:
    w = World()
    w.b.handshake = Handshake.PRIVATE
    out = w.b.self_update()
    rejected(w.seq.submit(w.commit(w.b, B, out.commit), NOW), ErrorCode.INVALID_COMMIT)


def test_ephemeral_frames_are_not_numbered() -> None:
    w = World()
    decision = accepted(w.seq.submit(frame(Opcode.TYPING, B, 0), NOW))
    assert decision.entry is None
    assert w.seq.next_log_index == 1


@pytest.mark.parametrize("opcode", [Opcode.APP_RECEIPT, Opcode.APP_REACTION])
def test_receipts_and_reactions_need_valid_payloads(opcode: int) -> None:
    w = World()
    rejected(
        w.seq.submit(frame(opcode, B, 1, RawPayload(b"\xa0").encode()), NOW),
        ErrorCode.INVALID_PAYLOAD,
    )


def test_a_resent_frame_is_answered_not_numbered_twice() -> None:
    w = World()
    original = w.message(w.b, B)
    first = accepted(w.seq.submit(original, NOW))
    assert first.entry is not None
    # The client did not see the echo and resends (re-encrypted, same request id).
    resend = w.message(w.b, B)
    resend.header.request_id = original.header.request_id
    decision = w.seq.submit(resend, NOW)
    assert decision == Duplicate(first.entry.log_index)
    assert w.seq.next_log_index == 2
    # Request id 0 (reference clients never set one) is never treated as a resend.
    zero_a = frame(Opcode.APP_MESSAGE, B, 1, original.payload, request_id=0)
    zero_b = frame(Opcode.APP_MESSAGE, B, 1, original.payload, request_id=0)
    accepted(w.seq.submit(zero_a, NOW))
    accepted(w.seq.submit(zero_b, NOW))


def test_the_active_members_follow_every_change_of_the_roster() -> None:
    # The set every sequenced frame goes to is kept between frames: any change of the roster,
    # whoever makes it (a commit, a kick, the Welcome of a private room), must renew it.
    room = Room(ROOM, 0, 0, A, NOW)
    members = {m: RoomMember(m, Role.MEMBER, i) for i, m in enumerate((A, B))}
    seq = RoomSequencer(RoomState(room, members, {}))
    assert seq.active_members() == {A, B}
    seq.members[C] = RoomMember(C, Role.MEMBER, 2)
    assert seq.active_members() == {A, B, C}
    seq.members[B] = RoomMember(B, Role.REMOVED, 1)
    assert seq.active_members() == {A, C}
    seq.members.pop(C)
    assert seq.active_members() == {A}
    with pytest.raises(KeyError):
        seq.members.pop(C)
    assert seq.members.pop(C, None) is None
    del seq.members[A]
    assert seq.active_members() == frozenset()
    seq.members.update({D: RoomMember(D, Role.MODERATOR, 3)})
    assert seq.active_members() == {D}
    seq.members.setdefault(A, RoomMember(A, Role.OWNER, 0))
    assert seq.active_members() == {A, D}
    seq.members.clear()
    assert seq.active_members() == frozenset()
