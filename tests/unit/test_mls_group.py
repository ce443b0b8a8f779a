"""Our MLS layer end to end: the issue's scenario, commit races, rollback, persistence,
external joins and external-sender removals, on both supported cipher suites."""

from __future__ import annotations

import os
import struct
import time

import pytest

from kalandra_core.crypto import DecryptionFailed, EpochMismatch, SenderKeyStore
from kalandra_core.mls.errors import (
    GroupInactive,
    InvalidMlsMessage,
    PendingCommitExists,
    WrongEpoch,
)
from kalandra_core.mls.group import Handshake, MlsGroup, external_remove_proposal
from kalandra_core.mls.keypackage import (
    SUITE_X25519_AES128GCM,
    SUITE_X25519_CHACHA20,
    KeyPackageBundle,
    build_key_package,
    member_id_of,
    signature_public_key,
)

STATE_KEY = os.urandom(32)


def keys(*ids: int) -> dict[int, bytes]:
    return {i: os.urandom(32) for i in ids}


def store_for(group: MlsGroup) -> SenderKeyStore:
    return SenderKeyStore(
        epoch=group.epoch,
        epoch_secret=group.sender_key_secret(),
        own_index=group.own_leaf_index,
        member_indices={m.leaf_index for m in group.members()},
    )


def follow(store: SenderKeyStore, group: MlsGroup) -> None:
    store.rekey(
        epoch=group.epoch,
        epoch_secret=group.sender_key_secret(),
        member_indices={m.leaf_index for m in group.members()},
        own_index=group.own_leaf_index,
    )


def reload(group: MlsGroup) -> MlsGroup:
    blob = group.seal(STATE_KEY)
    assert group.sender_key_secret() not in blob  # encrypted at rest
    return MlsGroup.unseal(STATE_KEY, blob)


def three_member_group(suite: int = SUITE_X25519_AES128GCM) -> tuple[MlsGroup, ...]:
    sk = keys(1, 2, 3)
    a = MlsGroup.create(1, sk[1], suite=suite)
    kb = build_key_package(2, sk[2], suite=suite)
    kc = build_key_package(3, sk[3], suite=suite)
    out = a.add([kb.key_package, kc.key_package])
    assert a.epoch == 0  # pending until the sequencer accepts it
    assert set(out.welcomes) == {2, 3}
    result = a.process(out.commit)  # our own commit echoed back: merged, not reprocessed
    assert (result.kind, result.epoch, result.added) == ("own_commit", 1, (2, 3))
    b = MlsGroup.join(out.welcomes[2], kb)
    c = MlsGroup.join(out.welcomes[3], kc)
    return a, b, c


@pytest.mark.parametrize("suite", [SUITE_X25519_AES128GCM, SUITE_X25519_CHACHA20])
def test_issue_scenario(suite: int) -> None:
    a, b, c = three_member_group(suite)
    assert a.epoch == b.epoch == c.epoch == 1
    assert a.sender_key_secret() == b.sender_key_secret() == c.sender_key_secret()
    assert [m.member_id for m in b.members()] == [1, 2, 3]
    assert a.epoch_authenticator == b.epoch_authenticator == c.epoch_authenticator

    stores = {g.member_id: store_for(g) for g in (a, b, c)}
    for sender in stores.values():
        msg = sender.encrypt(b"hello from %d" % sender.own_index)
        for receiver in stores.values():
            assert receiver.decrypt(msg) == b"hello from %d" % sender.own_index

    # A removes C; B and A follow, C learns it was removed.
    removal = a.remove([3])
    assert b.process(removal.commit).removed == (3,)
    c_result = c.process(removal.commit)
    assert c_result.removed_self
    assert a.process(removal.commit).epoch == 2
    with pytest.raises(GroupInactive):
        c.export_secret(b"x", b"", 32)
    for g in (a, b):
        follow(stores[g.member_id], g)

    # B self-updates; every state is saved, reloaded and goes on.
    a, b = reload(a), reload(b)
    update = b.self_update()
    a.process(update.commit)
    b.process(update.commit)
    a, b = reload(a), reload(b)
    assert a.epoch == b.epoch == 3
    assert a.sender_key_secret() == b.sender_key_secret()
    for g in (a, b):
        follow(stores[g.member_id], g)
    after = stores[1].encrypt(b"C must not read this")
    assert stores[2].decrypt(after) == b"C must not read this"
    with pytest.raises(EpochMismatch):
        stores[3].decrypt(after)
    # Even with the epoch number forged, C's last secret (epoch 1) yields the wrong key.
    stores[3].rekey(epoch=3, epoch_secret=c_secret_guess(c), member_indices={0, 1, 2})
    with pytest.raises(DecryptionFailed):
        stores[3].decrypt(after)


def c_secret_guess(c: MlsGroup) -> bytes:
    # The most C can know: its own last exporter output, from its final (epoch 1) state.
    state = MlsGroup.from_bytes(c.to_bytes())
    state._active = True
    return state.sender_key_secret()


def test_key_package_builder() -> None:
    sk = os.urandom(32)
    bundle = build_key_package(0x0102030405060708, sk, now=time.time())
    from kalandra_core.mls._lib import crypto_for_suite
    from kalandra_core.mls.keypackage import parse_key_package

    kp = parse_key_package(bundle.key_package, crypto_for_suite(1))
    assert kp.leaf_node is not None
    assert kp.leaf_node.credential is not None
    assert kp.leaf_node.credential.identity == struct.pack("<Q", 0x0102030405060708)
    assert member_id_of(kp.leaf_node.credential.identity) == 0x0102030405060708
    assert kp.leaf_node.signature_key == signature_public_key(sk)
    assert kp.leaf_node.lifetime_not_before <= int(time.time()) - 290  # backdated
    assert KeyPackageBundle.from_bytes(bundle.to_bytes()) == bundle
    tampered = bytearray(bundle.key_package)
    tampered[-5] ^= 1
    with pytest.raises(InvalidMlsMessage):
        parse_key_package(bytes(tampered), crypto_for_suite(1))


def test_losing_commit_is_discarded_and_rebuilt() -> None:
    a, b, c = three_member_group()
    mine = a.self_update()
    theirs = b.self_update()
    # The sequencer took B's commit first: A sees it, its own pending commit is void.
    assert a.process(theirs.commit).epoch == 2
    assert not a.has_pending_commit
    b.process(theirs.commit)
    c.process(theirs.commit)
    with pytest.raises(WrongEpoch):
        c.process(mine.commit)  # the stale loser never applies anywhere
    retry = a.self_update()
    for g in (a, b, c):
        assert g.process(retry.commit).epoch == 3
    assert a.sender_key_secret() == b.sender_key_secret() == c.sender_key_secret()


def test_one_pending_commit_at_a_time() -> None:
    a, _, _ = three_member_group()
    a.self_update()
    with pytest.raises(PendingCommitExists):
        a.self_update()
    a.discard_pending()
    a.self_update()


def test_pending_commit_survives_a_restart() -> None:
    a, b, _ = three_member_group()
    out = a.self_update()
    a = reload(a)  # crashed after sending, before the echo
    assert a.process(out.commit).kind == "own_commit"
    b.process(out.commit)
    assert a.sender_key_secret() == b.sender_key_secret()


def test_bad_commit_leaves_state_untouched() -> None:
    a, b, _ = three_member_group()
    out = b.self_update()
    before = (a.epoch, a.sender_key_secret(), a.tree_hash)
    for i in (40, len(out.commit) // 2, len(out.commit) - 3):
        forged = bytearray(out.commit)
        forged[i] ^= 0x01
        with pytest.raises(InvalidMlsMessage):
            a.process(bytes(forged))
        assert (a.epoch, a.sender_key_secret(), a.tree_hash) == before
    with pytest.raises(InvalidMlsMessage):
        a.process(b"\x00\x01garbage")
    assert a.process(out.commit).epoch == 2  # the genuine one still applies


def test_external_join_and_server_remove_proposal() -> None:
    server_key = os.urandom(32)
    sk = keys(1, 2, 9)
    a = MlsGroup.create(1, sk[1], external_senders=[(signature_public_key(server_key), 0)])
    kb = build_key_package(2, sk[2])
    out = a.add([kb.key_package])
    a.process(out.commit)
    b = MlsGroup.join(out.welcomes[2], kb)

    # A bridge-like member joins on its own from the published GroupInfo.
    joiner, commit = MlsGroup.external_join(a.group_info(), 9, sk[9])
    assert a.process(commit.commit).added == (9,)
    assert b.process(commit.commit).added == (9,)
    assert a.sender_key_secret() == b.sender_key_secret() == joiner.sender_key_secret()
    assert joiner.own_leaf_index == 2

    # The server (no group secrets) proposes removing member 2; a member commits it.
    proposal = external_remove_proposal(
        group_id=a.group_id,
        epoch=a.epoch,
        sender_index=0,
        removed_leaf=a.leaf_of(2),
        signing_key=server_key,
    )
    for g in (a, b, joiner):
        assert g.process(proposal).kind == "proposal"
    removal = joiner.commit_pending_proposals()
    assert b.process(removal.commit).removed_self
    for g in (a, joiner):
        assert g.process(removal.commit).removed == (2,)
    assert [m.member_id for m in a.members()] == [1, 9]
    assert a.sender_key_secret() == joiner.sender_key_secret()

    # A forged external proposal (wrong key) is refused.
    forged = external_remove_proposal(
        group_id=a.group_id,
        epoch=a.epoch,
        sender_index=0,
        removed_leaf=0,
        signing_key=os.urandom(32),
    )
    with pytest.raises(InvalidMlsMessage):
        a.process(forged)


def test_handshake_mode_is_persisted() -> None:
    g = MlsGroup.create(1, os.urandom(32), handshake=Handshake.PRIVATE)
    assert reload(g).handshake is Handshake.PRIVATE


@pytest.mark.parametrize("suite", [SUITE_X25519_AES128GCM, SUITE_X25519_CHACHA20])
def test_private_handshakes(suite: int) -> None:
    """Commits as PrivateMessage (what OpenMLS PURE_CIPHERTEXT clients require)."""
    sk = keys(1, 2, 3)
    a = MlsGroup.create(1, sk[1], suite=suite, handshake=Handshake.PRIVATE)
    kb, kc = build_key_package(2, sk[2], suite=suite), build_key_package(3, sk[3], suite=suite)
    out = a.add([kb.key_package, kc.key_package])
    assert out.commit[2:4] == b"\x00\x02"  # wire format mls_private_message
    a.process(out.commit)
    b = MlsGroup.join(out.welcomes[2], kb, handshake=Handshake.PRIVATE)
    c = MlsGroup.join(out.welcomes[3], kc)  # a public-handshake member reads them too
    for committer in (b, c, a):
        update = committer.self_update()
        for g in (a, b, c):
            g.process(update.commit)
    assert a.epoch == b.epoch == c.epoch == 4
    assert a.sender_key_secret() == b.sender_key_secret() == c.sender_key_secret()
    removal = b.remove([3])
    assert removal.commit[2:4] == b"\x00\x02"
    assert c.process(removal.commit).removed_self
    a.process(removal.commit)
    b.process(removal.commit)
    assert a.sender_key_secret() == b.sender_key_secret()


def test_private_handshake_generation_is_never_reused() -> None:
    sk = keys(1, 2)
    a = MlsGroup.create(1, sk[1], handshake=Handshake.PRIVATE)
    kb = build_key_package(2, sk[2])
    out = a.add([kb.key_package])
    a.process(out.commit)
    b = MlsGroup.join(out.welcomes[2], kb)
    first = a.self_update()
    a.discard_pending()
    a = reload(a)
    second = a.self_update()
    # Same epoch, same sender: the encrypted sender data must name different generations.
    from kalandra_core.mls._lib import MLSMessage

    assert (
        MLSMessage.deserialize(first.commit).content
        != MLSMessage.deserialize(second.commit).content
    )
    assert b.process(second.commit).epoch == 2
    a.process(second.commit)
    assert a.sender_key_secret() == b.sender_key_secret()


@pytest.mark.parametrize("handshake", list(Handshake))
def test_leave_by_proposal(handshake: Handshake) -> None:
    sk = keys(1, 2, 3)
    a = MlsGroup.create(1, sk[1], handshake=handshake)
    kb, kc = build_key_package(2, sk[2]), build_key_package(3, sk[3])
    out = a.add([kb.key_package, kc.key_package])
    a.process(out.commit)
    b = MlsGroup.join(out.welcomes[2], kb, handshake=handshake)
    c = MlsGroup.join(out.welcomes[3], kc, handshake=handshake)
    leave = c.propose_leave()
    for g in (a, b, c):  # the log delivers it to everyone, its sender included
        assert g.process(leave).kind == "proposal"
    commit = b.commit_pending_proposals()
    assert c.process(commit.commit).removed_self
    assert a.process(commit.commit).removed == (3,)
    assert b.process(commit.commit).kind == "own_commit"
    assert a.sender_key_secret() == b.sender_key_secret()


def test_join_after_updates_by_different_members() -> None:
    """Regression: a Welcome whose tree holds an earlier committer's now-stale leaf
    parent_hash is valid (RFC 9420 §7.9.2 checks parent nodes, not every leaf)."""
    a, b, c = three_member_group()
    for committer in (a, b):
        update = committer.self_update()
        for g in (a, b, c):
            g.process(update.commit)
    kd = build_key_package(4, os.urandom(32))
    out = c.add([kd.key_package])
    for g in (a, b, c):
        g.process(out.commit)
    d = MlsGroup.join(out.welcomes[4], kd)
    assert d.sender_key_secret() == a.sender_key_secret()
