"""Self-check of the mls-rs interop oracle: mls-rs talking to mls-rs through the adapter.

If these pass, a failure in an interop test against our own MLS layer points at our side.
"""

from __future__ import annotations

import platform

import pytest

if platform.machine() != "x86_64":  # the binding ships a Linux wheel for x86_64 only
    pytest.skip("agentvault-mls-rs-uniffi has no wheel for this machine", allow_module_level=True)

from interop.mlsrs_oracle import (
    MlsRsError,
    MlsRsMember,
    OracleError,
    Outcome,
    WireFormat,
    member_identity,
    parse_message_header,
    parse_ratchet_tree,
)

LABEL = b"kalandra sender keys v1"
GROUP_ID = b"kalandra-oracle-selfcheck"


def _seed(n: int) -> bytes:
    return bytes([n]) * 32


def _member(member_id: int, **kwargs: bool) -> MlsRsMember:
    return MlsRsMember(member_identity(member_id), _seed(member_id), **kwargs)


def _exported(*members: MlsRsMember) -> set[bytes]:
    return {m.export_secret(LABEL, b"", 32) for m in members}


def test_wire_formats_and_headers() -> None:
    alice = _member(1)
    kp = alice.key_package()
    assert parse_message_header(kp).wire_format == WireFormat.KEY_PACKAGE
    assert kp[4:6] == b"\x00\x01"  # KeyPackage.cipher_suite = 0x0001

    alice.create_group(GROUP_ID)
    assert (alice.group_id, alice.epoch) == (GROUP_ID, 0)
    roster = alice.roster()
    assert list(roster) == [0]
    assert roster[0].identity == member_identity(1)
    assert roster[0].signature_key == alice.signature_public_key

    app = parse_message_header(alice.encrypt(b"x"))
    assert (app.wire_format, app.group_id, app.epoch, app.content_type) == (
        WireFormat.PRIVATE_MESSAGE,
        GROUP_ID,
        0,
        1,
    )


def test_add_join_update_remove() -> None:
    alice, bob, carol = _member(1), _member(2), _member(3)
    alice.create_group(GROUP_ID)

    commit, welcome = alice.add(bob.key_package(), carol.key_package())
    header = parse_message_header(commit)
    assert (header.wire_format, header.group_id, header.epoch) == (
        WireFormat.PUBLIC_MESSAGE,
        GROUP_ID,
        0,
    )
    assert (header.sender_leaf, header.content_type) == (0, 3)
    assert parse_message_header(welcome).wire_format == WireFormat.WELCOME
    assert alice.epoch == 1

    bob.join(welcome)  # the ratchet tree comes from the Welcome's extension
    carol.join(welcome)
    assert bob.group_id == carol.group_id == GROUP_ID
    assert alice.epoch == bob.epoch == carol.epoch == 1
    assert len(_exported(alice, bob, carol)) == 1
    assert {i: e.identity for i, e in bob.roster().items()} == {
        0: member_identity(1),
        1: member_identity(2),
        2: member_identity(3),
    }
    assert (bob.own_leaf_index, carol.own_leaf_index) == (1, 2)

    # Bob self-updates; the other two process it.
    before = alice.export_secret(LABEL, b"", 32)
    update = bob.self_update()
    assert parse_message_header(update).epoch == 1
    for other in (alice, carol):
        result = other.process(update)
        assert result.outcome == Outcome.NEW_EPOCH
        assert result.epoch == 2
        assert (result.sender_leaf, result.sender_identity) == (1, member_identity(2))
    assert len(_exported(alice, bob, carol)) == 1
    assert before not in _exported(alice)

    # An application message from Carol to the others.
    for other in (alice, bob):
        got = other.process(carol.encrypt(b"hello"))
        assert got.outcome == Outcome.APPLICATION
        assert (got.data, got.sender_leaf, got.epoch) == (b"hello", 2, 2)

    # Alice removes Carol by leaf index; Bob continues, Carol learns she is out.
    remove = alice.remove(2)
    assert alice.epoch == 3
    assert bob.process(remove).outcome == Outcome.NEW_EPOCH
    gone = carol.process(remove)
    assert (gone.outcome, gone.epoch, gone.sender_leaf) == (Outcome.REMOVED, 3, 0)
    assert carol.removed
    assert not carol.in_group
    with pytest.raises(OracleError):
        carol.export_secret(LABEL, b"", 32)
    assert bob.epoch == 3
    assert len(_exported(alice, bob)) == 1
    assert sorted(alice.roster()) == sorted(bob.roster()) == [0, 1]

    # Bob removes Alice by identity; the leaf of the committer is not leaf 0 this time.
    remove = bob.remove_identity(member_identity(1))
    gone = alice.process(remove)
    assert (gone.outcome, gone.sender_leaf, gone.epoch) == (Outcome.REMOVED, 1, 4)
    assert bob.epoch == 4
    assert list(bob.roster()) == [1]


def test_join_with_out_of_band_tree_and_later_add() -> None:
    alice = _member(1, ratchet_tree_extension=False)
    bob, carol = _member(2), _member(3)
    alice.create_group(GROUP_ID)
    _, welcome = alice.add(bob.key_package())
    with pytest.raises(MlsRsError, match="ratchet tree not provided"):
        bob.join(welcome)  # no ratchet_tree extension: the tree must come out of band
    tree = alice.ratchet_tree()
    assert [e.identity for e in parse_ratchet_tree(tree)] == [
        member_identity(1),
        member_identity(2),
    ]
    bob.join(welcome, tree)
    assert bob.epoch == 1

    # Bob (ratchet_tree extension on) adds Carol; Alice processes it, Carol joins.
    commit, welcome = bob.add(carol.key_package())
    assert alice.process(commit).outcome == Outcome.NEW_EPOCH
    carol.join(welcome)
    assert alice.epoch == bob.epoch == carol.epoch == 2
    assert len(_exported(alice, bob, carol)) == 1


def test_same_seed_gives_same_signature_key() -> None:
    a, b = _member(9), _member(9)
    assert a.signature_public_key == b.signature_public_key
    assert len(a.signature_public_key) == 32
