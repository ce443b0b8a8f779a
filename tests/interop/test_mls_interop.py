"""Byte-level MLS interop between our ``MlsGroup`` and AWS mls-rs (through ``mlsrs_oracle``).

No mocks: every commit, Welcome and KeyPackage crosses between the two implementations as the
exact MLSMessage bytes the other one produced, and both sides must derive the same exporter
secrets in every epoch.

mls-rs only accepts MLSMessage-wrapped KeyPackages (a bare TLS KeyPackage, as we publish it,
fails with "Unsupported enum discriminant"), so the tests wrap ours before handing them over:
MLSMessage = version u16 0x0001 ‖ wire_format u16 0x0005 (key_package) ‖ KeyPackage.
Our ``add`` takes mls-rs' wrapped KeyPackages as they are.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import pytest

if platform.machine() != "x86_64":  # the binding ships a Linux wheel for x86_64 only
    pytest.skip("agentvault-mls-rs-uniffi has no wheel for this machine", allow_module_level=True)

from interop.mlsrs_oracle import MlsRsError, MlsRsMember, Outcome, member_identity

from kalandra_core.mls.errors import GroupInactive, InvalidMlsMessage
from kalandra_core.mls.group import SENDER_KEY_LABEL, MlsGroup
from kalandra_core.mls.keypackage import KeyPackageBundle, build_key_package

Party = MlsGroup | MlsRsMember

#: (label, context, length) triples every member must agree on in every epoch.
EXPORTS = ((SENDER_KEY_LABEL, b"", 32), (b"kalandra interop check", b"context", 48))
MLSMESSAGE_KEY_PACKAGE = b"\x00\x01\x00\x05"  # version mls10, wire_format key_package


def wrap_key_package(key_package: bytes) -> bytes:
    """Our bare KeyPackage as the MLSMessage mls-rs insists on."""
    return MLSMESSAGE_KEY_PACKAGE + key_package


def bundle(member_id: int) -> KeyPackageBundle:
    return build_key_package(member_id, os.urandom(32))


def theirs(member_id: int, *, ratchet_tree_extension: bool = True) -> MlsRsMember:
    return MlsRsMember(member_identity(member_id), ratchet_tree_extension=ratchet_tree_extension)


def exports(party: Party) -> tuple[bytes, ...]:
    return tuple(party.export_secret(label, ctx, n) for label, ctx, n in EXPORTS)


def roster(party: Party) -> dict[int, tuple[bytes, bytes]]:
    """leaf index -> (credential identity, signature key), from either implementation."""
    if isinstance(party, MlsGroup):
        return {
            m.leaf_index: (member_identity(m.member_id), m.signature_key) for m in party.members()
        }
    return {i: (e.identity, e.signature_key) for i, e in party.roster().items()}


def assert_agree(parties: Sequence[Party], epoch: int) -> None:
    """Same group, same epoch, same roster and the same exporter secrets on every side."""
    assert [p.epoch for p in parties] == [epoch] * len(parties)
    assert len({p.group_id for p in parties}) == 1
    first = roster(parties[0])
    assert all(roster(p) == first for p in parties[1:])
    secrets = {exports(p) for p in parties}
    assert len(secrets) == 1
    assert all(len(s) == n for s, (_, _, n) in zip(secrets.pop(), EXPORTS, strict=True))


def follow(commit: bytes, receivers: Sequence[Party], epoch: int) -> None:
    """Deliver a commit to members that stay in the group (ours echo their own commits)."""
    for party in receivers:
        if isinstance(party, MlsGroup):
            result = party.process(commit)
            assert result.kind in ("commit", "own_commit")
            assert not result.removed_self
            assert result.epoch == epoch
        else:
            processed = party.process(commit)
            assert (processed.outcome, processed.epoch) == (Outcome.NEW_EPOCH, epoch)


def reload(group: MlsGroup) -> MlsGroup:
    return MlsGroup.from_bytes(group.to_bytes())


# --------------------------------------------------------------------------- acceptance 1


def test_mlsrs_creates_and_we_join_from_its_welcome() -> None:
    alice = theirs(1)
    alice.create_group(b"interop: mls-rs creates")
    kb = bundle(2)
    with pytest.raises(MlsRsError, match="Unsupported enum discriminant"):
        alice.add(kb.key_package)  # the bare form we publish is not accepted by mls-rs
    _, welcome = alice.add(wrap_key_package(kb.key_package))

    bob = MlsGroup.join(welcome, kb)
    assert_agree([alice, bob], 1)
    assert bob.own_leaf_index == 1
    assert [m.member_id for m in bob.members()] == [1, 2]
    assert alice.leaf_index_of(member_identity(2)) == 1


# --------------------------------------------------------------------------- acceptance 2


def test_we_create_and_mlsrs_joins_from_our_welcome() -> None:
    alice = MlsGroup.create(1, os.urandom(32), group_id=b"interop: we create")
    bob = theirs(2)
    out = alice.add([bob.key_package()])  # mls-rs publishes MLSMessage-wrapped KeyPackages
    assert set(out.welcomes) == {2}
    follow(out.commit, [alice], 1)

    bob.join(out.welcomes[2])
    assert_agree([alice, bob], 1)
    assert bob.own_leaf_index == 1


# --------------------------------------------------------------------------- acceptance 3


def test_update_commits_both_ways() -> None:
    ours = MlsGroup.create(1, os.urandom(32), group_id=b"interop: updates")
    mine_kp = bundle(3)
    other = theirs(2)
    out = ours.add([other.key_package(), mine_kp.key_package])
    follow(out.commit, [ours], 1)
    other.join(out.welcomes[2])
    mine = MlsGroup.join(out.welcomes[3], mine_kp)
    group: list[Party] = [ours, other, mine]
    assert_agree(group, 1)

    before, leaf_key = exports(ours), other.roster()[0].encryption_key
    out = ours.self_update()  # our UpdatePath, processed by mls-rs
    follow(out.commit, [ours, other, mine], 2)
    assert_agree(group, 2)
    assert exports(ours) != before
    assert other.roster()[0].encryption_key != leaf_key  # mls-rs took our new leaf key

    commit = other.self_update()  # mls-rs' UpdatePath, processed by both of ours
    result = ours.process(commit)
    assert (result.kind, result.committer, result.epoch) == ("commit", 2, 3)
    follow(commit, [mine], 3)
    assert_agree(group, 3)

    commit = other.self_update()  # again: mls-rs' next path starts from its new leaf key
    follow(commit, [ours, mine], 4)
    out = mine.self_update()
    follow(out.commit, [mine, ours, other], 5)
    assert_agree(group, 5)


def test_remove_commits_both_ways() -> None:
    a = MlsGroup.create(1, os.urandom(32), group_id=b"interop: removes")
    kb = bundle(2)
    x, y = theirs(3), theirs(4)
    out = a.add([kb.key_package, x.key_package(), y.key_package()])
    follow(out.commit, [a], 1)
    b = MlsGroup.join(out.welcomes[2], kb)
    x.join(out.welcomes[3])
    y.join(out.welcomes[4])
    assert_agree([a, b, x, y], 1)

    # We remove an mls-rs member: the others follow, the victim sees itself removed.
    out = a.remove([4])
    follow(out.commit, [a, b, x], 2)
    gone = y.process(out.commit)
    assert (gone.outcome, gone.sender_identity) == (Outcome.REMOVED, member_identity(1))
    assert y.removed
    assert_agree([a, b, x], 2)
    assert sorted(roster(a)) == [0, 1, 2]

    # mls-rs removes one of ours: that one learns it is out, our other member follows.
    commit = x.remove_identity(member_identity(2))
    result = b.process(commit)
    assert result.removed_self
    assert (result.kind, result.committer, result.removed) == ("commit", 3, (2,))
    with pytest.raises(GroupInactive):
        b.export_secret(SENDER_KEY_LABEL, b"", 32)
    result = a.process(commit)
    assert (result.committer, result.removed, result.epoch) == (3, (2,), 3)
    assert_agree([a, x], 3)
    assert sorted(roster(a)) == [0, 2]

    # The survivors keep going: an update from each side after the removals.
    out = a.self_update()
    follow(out.commit, [a, x], 4)
    follow(x.self_update(), [a], 5)
    assert_agree([a, x], 5)


# --------------------------------------------------------------------------- acceptance 4


def test_mixed_group_through_epochs_with_reloads() -> None:
    # mls-rs creates and adds our first member; ours adds the rest (one of each).
    x = theirs(10)
    x.create_group(b"interop: mixed")
    ka, kb = bundle(1), bundle(2)
    _, welcome = x.add(wrap_key_package(ka.key_package))
    a = MlsGroup.join(welcome, ka)
    y = theirs(11)
    out = a.add([y.key_package(), kb.key_package])
    assert set(out.welcomes) == {2, 11}
    a = reload(a)  # saved with the commit still pending
    follow(out.commit, [a, x], 2)
    y.join(out.welcomes[11])
    b = MlsGroup.join(out.welcomes[2], kb)
    assert_agree([a, b, x, y], 2)

    # Several epochs of updates from all four members, our states saved/reloaded in between.
    follow(y.self_update(), [a, b, x], 3)
    a, b = reload(a), reload(b)
    assert_agree([a, b, x, y], 3)
    out = b.self_update()
    b = reload(b)
    follow(out.commit, [b, a, x, y], 4)
    follow(x.self_update(), [a, b, y], 5)
    a = reload(a)
    out = a.self_update()
    follow(out.commit, [a, b, x, y], 6)
    assert_agree([a, b, x, y], 6)

    # Membership changes across implementations: mls-rs adds a third member of ours (the tree
    # grows to 8 leaves), we remove the mls-rs creator, mls-rs removes the newcomer again.
    kc = bundle(3)
    commit, welcome = y.add(wrap_key_package(kc.key_package))
    follow(commit, [a, b, x], 7)
    # Earlier committers' leaves now carry parent_hash values that later UpdatePaths made
    # stale, which RFC 9420 §7.9.2 allows (only parent nodes must be parent-hash valid).
    c = MlsGroup.join(welcome, kc)
    assert_agree([a, b, c, x, y], 7)
    b = reload(b)
    out = b.remove([10])
    follow(out.commit, [b, a, c, y], 8)
    assert x.process(out.commit).outcome == Outcome.REMOVED
    a, c = reload(a), reload(c)
    assert_agree([a, b, c, y], 8)
    commit = y.remove_identity(member_identity(3))
    follow(commit, [a, b], 9)
    assert c.process(commit).removed_self
    a, b = reload(a), reload(b)
    follow(y.self_update(), [a, b], 10)
    assert_agree([a, b, y], 10)
    assert sorted(m.member_id for m in a.members()) == [1, 2, 11]


# --------------------------------------------------------------------------- ratchet tree


def test_join_with_ratchet_tree_out_of_band() -> None:
    alice = theirs(1, ratchet_tree_extension=False)
    alice.create_group(b"interop: tree out of band")
    kb = bundle(2)
    _, welcome = alice.add(wrap_key_package(kb.key_package))
    with pytest.raises(InvalidMlsMessage):
        MlsGroup.join(welcome, kb)  # no ratchet_tree extension and no tree given
    bob = MlsGroup.join(welcome, kb, ratchet_tree=alice.ratchet_tree())
    assert_agree([alice, bob], 1)

    out = bob.self_update()
    follow(out.commit, [bob, alice], 2)
    follow(alice.self_update(), [bob], 3)
    assert_agree([alice, bob], 3)

    # After updates from both sides, a second member of ours joins the same way.
    kc = bundle(3)
    commit, welcome = alice.add(wrap_key_package(kc.key_package))
    follow(commit, [bob], 4)
    carol = MlsGroup.join(welcome, kc, ratchet_tree=alice.ratchet_tree())
    assert_agree([alice, bob, carol], 4)
