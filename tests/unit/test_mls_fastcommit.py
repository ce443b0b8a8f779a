"""kalandra_core.mls.fastcommit: the library's results and error types on the paths of a received
commit and of a join, with less work (bench/mls.py measures the speed)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import pytest
from helpers.mls import group_of

from kalandra_core.mls import fastcommit, fastpaths
from kalandra_core.mls._lib import (
    Commit,
    ExtensionType,
    GroupInfo,
    InvalidSignatureError,
    MLSMessage,
    RatchetTree,
    crypto_for_suite,
    deserialize_extensions,
    group_tree,
    tree_math,
)
from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import build_key_package


def _error(fn: Callable[[], object]) -> type[Exception] | None:
    try:
        fn()
    except Exception as exc:
        return type(exc)
    return None


@pytest.mark.parametrize("suite", [1, 3])  # the Ed25519 suites
def test_signatures_verify_as_the_library_verifies_them(suite: int) -> None:
    crypto = crypto_for_suite(suite)
    private = os.urandom(32)
    public = crypto.signature_public_from_private(private)
    data = os.urandom(300)
    signature = crypto.sign(private, data)
    cases = [
        (public, data, signature),  # valid
        (public, data + b"x", signature),  # other data
        (public, data, bytes(64)),  # zero signature of the right length
        (public, data, signature[:-1]),  # short signature
        (public, data, signature + b"\x00"),  # long signature
        (public[:-1], data, signature),  # short key
        (bytes(32), data, signature),  # all-zero key
        (bytes([255] * 32), data, signature),  # not a point's encoding
    ]
    for key, message, sig in cases:
        ours = _error(lambda: crypto.verify(key, message, sig))  # noqa: B023
        theirs = _error(lambda: fastcommit.library_verify(crypto, key, message, sig))  # noqa: B023
        assert ours is theirs, (key.hex(), len(sig))
    assert _error(lambda: crypto.verify(public, data, signature)) is None
    assert _error(lambda: crypto.verify(public, data + b"x", signature)) is InvalidSignatureError


def test_other_signature_schemes_are_the_librarys() -> None:
    crypto = crypto_for_suite(2)  # ECDSA P-256
    assert _error(lambda: crypto.verify(b"\x04" + bytes(64), b"data", bytes(64))) is _error(
        lambda: fastcommit.library_verify(crypto, b"\x04" + bytes(64), b"data", bytes(64))
    )


@pytest.mark.parametrize("suite", [1, 2, 3, 5, 7])
def test_hash_is_the_librarys(suite: int) -> None:
    crypto = crypto_for_suite(suite)
    for data in (b"", b"a", os.urandom(1000)):
        assert crypto.hash(data) == fastcommit.library_hash(crypto, data)


def test_tree_hashes_are_the_librarys() -> None:
    group = group_of(23, removed=5)
    more = [build_key_package(900 + i, os.urandom(32)) for i in range(4)]
    group.process(group.add([b.key_package for b in more]).commit)  # unmerged leaves
    tree = group_tree(group._lib)
    assert isinstance(tree, RatchetTree)
    root = tree.calculate_tree_hash()
    hashes = [tree.get_node(i).hash for i in range(tree.node_width())]
    width = tree.node_width()
    # Every node, then one leaf and its direct path (what a commit leaves unhashed).
    for cleared in (range(width), [10, *tree_math.direct_path(10, tree.n_leaves)]):
        for ensure in (
            fastcommit.library_ensure_hash_bottom_up,
            RatchetTree._ensure_hash_bottom_up,
        ):
            for index in cleared:
                tree.get_node(index).hash = None
            ensure(tree, tree_math.root(tree.n_leaves))
            assert [tree.get_node(i).hash for i in range(width)] == hashes
    assert tree.calculate_tree_hash() == root == group.tree_hash


def test_resolutions_are_the_librarys() -> None:
    group = group_of(23, removed=5)
    more = [build_key_package(900 + i, os.urandom(32)) for i in range(4)]
    group.process(group.add([b.key_package for b in more]).commit)  # unmerged leaves
    tree = group_tree(group._lib)
    assert isinstance(tree, RatchetTree)
    leaf_keys = [tree.get_node(i).public_key for i in range(0, tree.node_width(), 2)]
    excluded = {k for k in leaf_keys[3:9] if k}
    for index in range(tree.node_width()):
        for exclude in (None, excluded):
            ours = tree.resolve_indices(index, exclude)
            assert ours == fastcommit.library_resolve_indices(tree, index, exclude)
            nodes = tree.resolve(index, exclude)
            assert nodes == fastcommit.library_resolve(tree, index, exclude)
            assert [id(n) for n in nodes] == [id(tree.get_node(i)) for i in ours]
    # Out of the tree: the library's own answer.
    width = tree.node_width()
    assert tree.resolve_indices(width + 4) == fastcommit.library_resolve_indices(tree, width + 4)


def test_commit_decodes_as_the_library_decodes_it() -> None:
    creator = MlsGroup.create(1, os.urandom(32))
    bundles = [build_key_package(100 + i, os.urandom(32)) for i in range(300)]
    creator.process(creator.add([b.key_package for b in bundles]).commit)
    message = MLSMessage.deserialize(creator.self_update().commit)
    creator.discard_pending()
    content = message.get_parsed_content().tbs.framed_content.content  # type: ignore[union-attr]
    assert len(content) >= fastcommit._MEMO_FROM  # big enough to be remembered
    expected = fastcommit.library_commit_deserialize(content)
    first = Commit.deserialize(content)
    second = Commit.deserialize(content)
    assert first == second == expected
    assert first is not second
    assert first.path is not None
    assert second.path is not None
    first.path.nodes.clear()  # a caller's changes stay its own
    second.path.nodes[0].encrypted_path_secrets.clear()
    assert Commit.deserialize(content) == expected
    assert Commit.deserialize(content + b"trailing") == expected
    other = creator.remove([bundles[5].member_id]).commit
    other_content = MLSMessage.deserialize(other).get_parsed_content().tbs.framed_content.content  # type: ignore[union-attr]
    assert Commit.deserialize(other_content) == fastcommit.library_commit_deserialize(
        other_content
    )
    for cut in (content[:-1], content[:100]):
        assert _error(lambda: Commit.deserialize(cut)) is _error(  # noqa: B023
            lambda: fastcommit.library_commit_deserialize(cut)  # noqa: B023
        )


def test_garbage_collection_resumes_after_big_operations() -> None:
    seen: list[bool] = []
    with fastpaths.gc_paused():
        seen.append(gc.isenabled())
        with fastpaths.gc_paused():
            seen.append(gc.isenabled())
        seen.append(gc.isenabled())
    assert seen == [False, False, False]
    assert gc.isenabled()
    with pytest.raises(ValueError, match="fails inside"), fastpaths.gc_paused():
        raise ValueError("fails inside")
    assert gc.isenabled()
    group = MlsGroup.from_bytes(group_of(5).to_bytes())
    group.process(group.self_update().commit)
    assert gc.isenabled()
    gc.disable()
    try:
        with fastpaths.gc_paused():
            pass
        assert not gc.isenabled()  # left off, as it was
    finally:
        gc.enable()


def test_joiners_take_the_group_info_key_from_its_signer_only() -> None:
    # RFC 9420 §12.4.3.1: the GroupInfo is verified with the key of its signer's leaf. The
    # library tries every leaf's key, so it also accepted a GroupInfo naming one member as
    # signer and signed by another (and hashed the whole tree once per key it tried).
    creator = MlsGroup.create(1, os.urandom(32))
    seeds = [os.urandom(32) for _ in range(2)]
    bundles = [build_key_package(100 + i, seed) for i, seed in enumerate(seeds)]
    creator.process(creator.add([b.key_package for b in bundles]).commit)
    info = MLSMessage.deserialize(creator.group_info()).get_parsed_content()
    assert isinstance(info, GroupInfo)
    assert info.signer_leaf_index == 0
    crypto = crypto_for_suite(1)
    (tree_ext,) = [
        e
        for e in deserialize_extensions(info.extensions)
        if e.ext_type == ExtensionType.RATCHET_TREE
    ]
    tbs = info.tbs_serialize()
    other_key = crypto.signature_public_from_private(seeds[0])  # the member at leaf 1
    forged = crypto.sign_with_label(seeds[0], b"GroupInfoTBS", tbs)
    signer_key = group_tree(creator._lib).get_node(0).leaf_node.signature_key
    fastpaths.library_verify_with_label(crypto, other_key, b"GroupInfoTBS", tbs, forged)
    crypto.verify_with_label(other_key, b"GroupInfoTBS", tbs, forged)  # not joining: as before
    with fastpaths.joining():
        RatchetTree(crypto).load_full_tree_from_welcome_bytes(tree_ext.data)
        with pytest.raises(InvalidSignatureError):
            crypto.verify_with_label(other_key, b"GroupInfoTBS", tbs, forged)
        crypto.verify_with_label(signer_key, b"GroupInfoTBS", tbs, info.signature.value)


def test_a_welcome_from_a_later_leaf_is_joined() -> None:
    creator = MlsGroup.create(1, os.urandom(32))
    bundles = [build_key_package(100 + i, os.urandom(32)) for i in range(3)]
    out = creator.add([b.key_package for b in bundles])
    creator.process(out.commit)
    last = MlsGroup.join(out.welcomes[bundles[2].member_id], bundles[2])
    assert last.own_leaf_index == 3
    joiner = build_key_package(500, os.urandom(32))
    added = last.add([joiner.key_package])
    last.process(added.commit)
    member = MlsGroup.join(added.welcomes[500], joiner)
    assert (member.epoch, member.tree_hash) == (last.epoch, last.tree_hash)
