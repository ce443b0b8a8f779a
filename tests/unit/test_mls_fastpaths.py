"""kalandra_core.mls.fastpaths and the linear tree state of _lib: the library's results, byte
for byte and error for error, without its quadratic costs (bench/mls.py measures the speed)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
from helpers.mls import group_of

from kalandra_core.mls import _lib, fastpaths
from kalandra_core.mls._lib import (
    Extension,
    ExtensionType,
    GroupInfo,
    MLSMessage,
    RatchetTree,
    UpdatePathNode,
    Welcome,
    crypto_for_suite,
    deserialize_extensions,
    group_tree,
    tree_math,
    write_opaque_varint,
)
from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import build_key_package


def test_tree_state_is_the_librarys_bytes() -> None:
    for group in (group_of(2), group_of(23, removed=5)):
        tree = group_tree(group._lib)
        assert isinstance(tree, RatchetTree)
        assert _lib._tree_state(tree) == _lib._library_serialize_tree(tree)


def test_kept_node_states_follow_changes() -> None:
    # A receiver's commits change its live tree in place, after it saved the state (and kept
    # each node's encoding) for the previous epoch.
    creator = MlsGroup.create(1, os.urandom(32))
    bundles = [build_key_package(100 + i, os.urandom(32)) for i in range(12)]
    out = creator.add([b.key_package for b in bundles])
    creator.process(out.commit)
    member = MlsGroup.join(out.welcomes[bundles[3].member_id], bundles[3])
    joiner = build_key_package(999, os.urandom(32))
    commits: list[Callable[[], bytes]] = [
        lambda: creator.self_update().commit,
        lambda: creator.add([joiner.key_package]).commit,
        lambda: creator.remove([105, 999]).commit,
    ]
    tree = group_tree(member._lib)
    for make in commits:
        commit = make()
        assert member.process(commit).kind == "commit"
        creator.process(commit)
        assert group_tree(member._lib) is tree  # the same object, changed in place
        assert isinstance(tree, RatchetTree)
        assert _lib._tree_state(tree) == _lib._library_serialize_tree(tree)
    assert member.tree_hash == creator.tree_hash


def test_saved_tree_reloads_to_the_same_tree_hash() -> None:
    group = group_of(23, removed=5)
    blob = group.to_bytes()
    again = MlsGroup.from_bytes(blob)
    assert again.tree_hash == group.tree_hash
    assert again.to_bytes() == blob
    assert [m.member_id for m in again.members()] == [m.member_id for m in group.members()]


def test_welcome_tree_loads_as_the_library_loads_it() -> None:
    group = group_of(40, removed=3)
    info = MLSMessage.deserialize(group.group_info()).get_parsed_content()
    assert isinstance(info, GroupInfo)
    (data,) = [
        e.data
        for e in deserialize_extensions(info.extensions)
        if e.ext_type == ExtensionType.RATCHET_TREE
    ]
    crypto = crypto_for_suite(group.suite)
    ours, theirs = RatchetTree(crypto), RatchetTree(crypto)
    ours.load_full_tree_from_welcome_bytes(data)
    fastpaths.library_welcome_tree_loader(theirs, data)
    assert ours.n_leaves == theirs.n_leaves == 64
    assert (
        ours.calculate_tree_hash() == theirs.calculate_tree_hash() == info.group_context.tree_hash
    )
    for index in range(ours.node_width()):
        a, b = ours.get_node(index), theirs.get_node(index)
        assert (a.public_key, a.parent_hash, a.leaf_node, a.unmerged_leaves) == (
            b.public_key,
            b.parent_hash,
            b.leaf_node,
            b.unmerged_leaves,
        )
    # Loaded twice while joining, the second load copies the first: the same tree again.
    with fastpaths.joining():
        first, second = RatchetTree(crypto), RatchetTree(crypto)
        first.load_full_tree_from_welcome_bytes(data)
        second.load_full_tree_from_welcome_bytes(data)
    assert second.calculate_tree_hash() == info.group_context.tree_hash
    assert second._nodes.keys() == first._nodes.keys()
    assert all(second._nodes[i] is not first._nodes[i] for i in first._nodes)


READ_CASES = [
    (b"", 0),
    (b"\x01", 0),
    (b"\x01", 1),
    (b"\x01", 5),
    (b"\x00\x02ab", 0),
    (b"\x00\x05ab", 0),
    (b"\x40\x3f", 0),
    (b"\x40\x40\x00", 0),
    (b"\x80\x00\x40\x00", 0),
    (b"\x80\x00\x3f\xff", 0),
    (b"\xc0", 0),
    (b"\x81\x00", 0),
    (bytes(range(20)), 3),
    (bytes(range(20)), -4),
]


@pytest.mark.parametrize("name", sorted(fastpaths._READERS))
def test_tls_readers_answer_as_the_librarys(name: str) -> None:
    fast, original = fastpaths._READERS[name], fastpaths._originals[name]
    for buf, offset in READ_CASES:
        args = (buf, offset, 2) if name == "read_vector" else (buf, offset)
        expected: object
        try:
            expected = original(*args)
        except Exception as exc:
            expected = (type(exc), str(exc))
        try:
            got: object = fast(*args)
        except Exception as exc:
            got = (type(exc), str(exc))
        assert got == expected, (name, buf, offset)


def test_leaf_parser_window_falls_back_to_the_whole_buffer() -> None:
    group = group_of(3)
    leaf = group_tree(group._lib).get_node(0).leaf_node
    assert leaf is not None
    encoded = leaf.serialize()
    tail = os.urandom(3 * fastpaths._WINDOW)
    assert type(leaf).deserialize_partial(encoded + tail) == (leaf, len(encoded))
    # A leaf longer than the window (a large extension) is parsed from the whole buffer.
    big = dataclasses.replace(
        leaf,
        extensions=[
            *(leaf.extensions or []),
            Extension(0xF0A0, os.urandom(2 * fastpaths._WINDOW)),
        ],
    )
    encoded = big.serialize()
    assert len(encoded) > fastpaths._WINDOW
    parsed, consumed = type(leaf).deserialize_partial(encoded + tail)
    assert consumed == len(encoded)
    assert parsed.serialize() == encoded


def test_capabilities_memo_hands_out_copies() -> None:
    group = group_of(2)
    leaf = group_tree(group._lib).get_node(0).leaf_node
    assert leaf is not None
    first = fastpaths._parse_capabilities(leaf.capabilities)
    first["extensions"].append(0xFFFF)
    second = fastpaths._parse_capabilities(leaf.capabilities)
    assert 0xFFFF not in second["extensions"]
    assert second == fastpaths._library_parse_capabilities(leaf.capabilities)


def test_update_path_node_codec_is_the_librarys() -> None:
    secrets = [
        write_opaque_varint(os.urandom(32)) + write_opaque_varint(os.urandom(n))
        for n in (0, 1, 63, 64, 100, 16_384)
    ]
    node = UpdatePathNode(os.urandom(32), secrets)
    encoded = node.serialize()
    assert encoded == fastpaths.library_path_node_serialize(node)
    assert UpdatePathNode.deserialize(encoded) == node
    assert fastpaths.library_path_node_deserialize(encoded) == node
    assert UpdatePathNode.deserialize(encoded + b"trailing") == node
    with pytest.raises(type(_error(fastpaths.library_path_node_deserialize, encoded[:-1]))):
        UpdatePathNode.deserialize(encoded[:-1])


def _error(fn: Callable[[bytes], object], data: bytes) -> Exception:
    try:
        fn(data)
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_welcome_parses_as_the_library_parses_it() -> None:
    creator = MlsGroup.create(1, os.urandom(32))
    bundles = [build_key_package(100 + i, os.urandom(32)) for i in range(7)]
    welcome = creator.add([b.key_package for b in bundles]).welcomes[bundles[0].member_id]
    body = welcome[4:]  # the MLSMessage header: version and wire format, two bytes each
    parsed = Welcome.deserialize(body)
    assert parsed == fastpaths.library_welcome_deserialize(body)
    assert len(parsed.secrets) == 7
    assert parsed.serialize() == body
    for cut in (body[:-1], body[:40], body[:2] + b"\x40"):
        expected = type(_error(fastpaths.library_welcome_deserialize, cut))
        with pytest.raises(expected):
            Welcome.deserialize(cut)


def test_tree_hash_input_is_the_librarys() -> None:
    group = group_of(23, removed=5)
    more = [build_key_package(900 + i, os.urandom(32)) for i in range(4)]
    group.process(group.add([b.key_package for b in more]).commit)  # unmerged leaves
    tree = group_tree(group._lib)
    assert isinstance(tree, RatchetTree)
    assert any(tree.get_node(i).unmerged_leaves for i in range(1, tree.node_width(), 2))
    root = tree.calculate_tree_hash()
    for index in range(tree.node_width()):  # rehash every node, children first
        tree.get_node(index).hash = None
    levels = sorted(range(tree.node_width()), key=tree_math.level)
    ours: dict[int, bytes | None] = {}
    for index in levels:
        fastpaths._hash_node(tree, index)
        ours[index] = tree.get_node(index).hash
        fastpaths.library_hash_node(tree, index)
        assert tree.get_node(index).hash == ours[index], index
    assert tree.calculate_tree_hash() == root == group.tree_hash
