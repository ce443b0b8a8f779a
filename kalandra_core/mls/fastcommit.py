"""Speed fixes for rfc9420 1.3.0 on the paths of a received commit and of a join, in groups
of thousands of members (docs/performance-targets.md). Same results, less work; each
replacement first checks that the library code it replaces is the audited 1.3.0 source
(LibraryChangedError otherwise), like ``fastpaths``.

* Ed25519 verification: the library verifies with OpenSSL through ``cryptography``, about
  twice the time of libsodium's ``crypto_sign_open`` for the same check. A join verifies every
  leaf's signature (10,000 in a 10,000-member group), so this is most of a join. libsodium is
  the stricter verifier (it also refuses small-order keys and non-canonical points, which no
  honest signer produces); wrong key or signature lengths still go to the library's code, so
  they fail exactly as before.
* Resolutions (RFC 9420 §4.1.1): ``RatchetTree.resolve`` and ``resolve_indices`` recurse with
  a call, a try block and a list concatenation per node; a received commit resolves every
  copath node of the committer several times (filtering the path, counting the encrypted path
  secrets, finding ours), which in a 10,000-leaf tree with blank parents walks the whole tree
  each time. The replacements walk the subtree iteratively, in the same order, and while
  one UpdatePath is merged each copath node is walked once (the merge changes no copath
  subtree).
* Hashing: ``DefaultCryptoProvider.hash`` made a ``cryptography`` Hash object per call, once
  per tree node; ``hashlib`` gives the same digest for less. The tree hash walk
  (``_ensure_hash_bottom_up``) recursed once per node; it runs on a stack, in the same order.
* ``Commit.deserialize``: a received commit is decoded three times (the message, the group
  wrapper, ``process_commit``), each decoding thousands of encrypted path secrets. The last
  commit decoded is remembered by its exact encoding, and a decode of exactly those bytes
  returns a copy of it (new lists, the same immutable bytes).
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Callable
from typing import Any

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from ._lib import (
    Commit,
    DefaultCryptoProvider,
    InvalidSignatureError,
    RatchetTree,
    RatchetTreeNode,
    SignatureScheme,
    UpdatePath,
    UpdatePathNode,
    replace_audited,
    require_library_source,
    tree_math,
)

_AUDITED = {
    "DefaultCryptoProvider.verify": (
        "ac99618341284a0a3c931d31de504b7fbdc06e507d18d0ec3d814e5a2b81085c"
    ),
    "RatchetTree.resolve": "a14280a51da58aef7acc35b488cc437e0c2a1aa2852cddba88140468bb0118e4",
    "RatchetTree.resolve_indices": (
        "89cea43a355c8505dc5f6e92c1fe08b3c1979153f3ff2aad68a85031e5998831"
    ),
    "RatchetTree.merge_update_path": (
        "0b735d063b4dce8237a6ab573e055cab5592e8c03bc79344622ad049d782e5a2"
    ),
    "DefaultCryptoProvider.hash": (
        "49680ed00a9e1279a065efb07e2b4cfb81d276cd9da8f4f22788d33f8d9cca07"
    ),
    "DefaultCryptoProvider._hash_algo": (
        "9737f519b96e50728c9d230e784fc1eab8213276cfe9f2233f32ed506ec0d0ac"
    ),
    "RatchetTree._ensure_hash_bottom_up": (
        "e83866f47ed609ffd2a2582fd493334be8471270d40146a3b6baf525737598ed"
    ),
    "Commit.deserialize": "33444dfe4a9d2efc497d634984471964baa8312c0df623839b5035834f7be769",
    "left": "c682a1552b5f2132200c967b2c91c995b182477dce8ef1f8d4a02df6aa7bf34e",
    "right": "abaf4ac69c4fb4e7cbf91d4f8aa99e819cf8730be4d019afb53e640a4da342ae",
}

# --- Ed25519 ---------------------------------------------------------------------------------

_library_verify = DefaultCryptoProvider.verify


def _verify(self: DefaultCryptoProvider, public_key: bytes, data: bytes, signature: bytes) -> None:
    if (
        self._suite.signature != SignatureScheme.ED25519
        or len(public_key) != 32
        or len(signature) != 64
    ):
        _library_verify(self, public_key, data, signature)
        return
    try:
        crypto_sign_open(bytes(signature) + bytes(data), bytes(public_key))
    except BadSignatureError as exc:
        raise InvalidSignatureError("invalid signature") from exc


library_verify = _library_verify  # for tests


def _replace_verify() -> None:
    replace_audited(
        DefaultCryptoProvider,
        "verify",
        _verify,
        _AUDITED["DefaultCryptoProvider.verify"],
        "Ed25519 verify",
    )


# --- hashing ---------------------------------------------------------------------------------

_library_hash = DefaultCryptoProvider.hash
_HASHLIB: dict[Any, Callable[[bytes], Any]] = {}


def _hash(self: DefaultCryptoProvider, data: bytes) -> bytes:
    # The library's Hash object per call costs more than hashing a tree node's few bytes.
    kdf = self._suite.kdf
    new = _HASHLIB.get(kdf)
    if new is None:
        new = _HASHLIB[kdf] = getattr(hashlib, self._hash_algo().name)  # type: ignore[no-untyped-call]
    return new(data).digest()  # type: ignore[no-any-return]


def _ensure_hash_bottom_up(self: RatchetTree, node_index: int) -> None:
    """The library's post-order walk (left subtree, right subtree, node) hashing every node
    without a hash, with a stack instead of a call per node."""
    get, n = self.get_node, self.n_leaves
    stack = [(node_index, False)]
    while stack:
        index, children_done = stack.pop()
        node = get(index)
        if children_done:
            self._hash_node(index)
        elif node.hash is None:
            if node.is_leaf:
                self._hash_node(index)
            else:
                stack.append((index, True))
                stack.append((tree_math.right(index, n), False))
                stack.append((tree_math.left(index), False))


library_hash = _library_hash  # for tests
library_ensure_hash_bottom_up = RatchetTree._ensure_hash_bottom_up


def _replace_hashing() -> None:
    if getattr(DefaultCryptoProvider.hash, "_kalandra_fast", False):
        return
    for func, name in (
        (DefaultCryptoProvider.hash, "DefaultCryptoProvider.hash"),
        (DefaultCryptoProvider._hash_algo, "DefaultCryptoProvider._hash_algo"),
        (RatchetTree._ensure_hash_bottom_up, "RatchetTree._ensure_hash_bottom_up"),
    ):
        require_library_source(func, _AUDITED[name], "hashing")
    _hash._kalandra_fast = True  # type: ignore[attr-defined]
    DefaultCryptoProvider.hash = _hash  # type: ignore[method-assign]
    RatchetTree._ensure_hash_bottom_up = _ensure_hash_bottom_up  # type: ignore[method-assign]


# --- resolutions -----------------------------------------------------------------------------

_library_resolve = RatchetTree.resolve
_library_resolve_indices = RatchetTree.resolve_indices


# While merging a received UpdatePath, the library resolves each copath node three times
# (filtering the path, counting the path secrets, finding ours) and between those it changes
# only the committer's leaf and direct path: no copath node's subtree. Those resolutions are
# kept for the duration of the merge.
_MERGING: contextvars.ContextVar[tuple[RatchetTree, dict[int, list[int]]] | None] = (
    contextvars.ContextVar("kalandra_merging", default=None)
)
_library_merge_update_path = RatchetTree.merge_update_path


def _merge_update_path(self: RatchetTree, *args: Any, **kwargs: Any) -> bytes:
    token = _MERGING.set((self, {}))
    try:
        return _library_merge_update_path(self, *args, **kwargs)
    finally:
        _MERGING.reset(token)


def _resolution(tree: RatchetTree, node_index: int) -> list[int] | None:
    """Node indices of the resolution of ``node_index``, in the library's order; None when the
    tree is not one the walk below is sure to handle as the library does (the caller then
    runs the library's own code)."""
    merging = _MERGING.get()
    if merging is None or merging[0] is not tree:
        return _walk_resolution(tree, node_index)
    memo = merging[1]
    res = memo.get(node_index)
    if res is None:
        res = _walk_resolution(tree, node_index)
        if res is not None:
            memo[node_index] = res
    return list(res) if res is not None else None


def _walk_resolution(tree: RatchetTree, node_index: int) -> list[int] | None:
    n = tree.n_leaves
    width = tree_math.node_width(n)
    if n <= 0 or n & (n - 1) or not 0 <= node_index < width:
        return None  # a full tree of 2^d leaves: no child index is ever out of range
    nodes = tree._nodes
    out: list[int] = []
    stack = [node_index]
    while stack:
        index = stack.pop()
        node = nodes.get(index)
        if node is None:
            node = tree.get_node(index)  # as the library: a missing node is made blank
        if node.public_key is not None:
            out.append(index)
            out.extend(leaf * 2 for leaf in node.unmerged_leaves if leaf * 2 < width)
        elif index & 1:  # a blank parent: its left subtree first, then its right
            half = 1 << (tree_math.level(index) - 1)
            stack.append(index ^ (half * 3))
            stack.append(index ^ half)
    return out


def _resolve_indices(
    self: RatchetTree, node_index: int, excluded_leaf_pubkeys: set[bytes] | None = None
) -> list[int]:
    res = _resolution(self, node_index)
    if res is None:
        return _library_resolve_indices(self, node_index, excluded_leaf_pubkeys)
    if excluded_leaf_pubkeys:
        get = self.get_node
        res = [i for i in res if get(i).public_key not in excluded_leaf_pubkeys]
    return res


def _resolve(
    self: RatchetTree, node_index: int, excluded_leaf_pubkeys: set[bytes] | None = None
) -> list[RatchetTreeNode]:
    res = _resolution(self, node_index)
    if res is None:
        return _library_resolve(self, node_index, excluded_leaf_pubkeys)
    get = self.get_node
    nodes = [get(i) for i in res]
    if excluded_leaf_pubkeys:
        nodes = [r for r in nodes if r.public_key not in excluded_leaf_pubkeys]
    return nodes


library_resolve = _library_resolve  # for tests
library_resolve_indices = _library_resolve_indices


def _replace_resolve() -> None:
    if getattr(RatchetTree.resolve, "_kalandra_fast", False):
        return
    for name in ("resolve", "resolve_indices", "merge_update_path"):
        require_library_source(
            getattr(RatchetTree, name), _AUDITED[f"RatchetTree.{name}"], "resolution"
        )
    # The walk computes the children as tree_math.left/right do in a full tree.
    for name in ("left", "right"):
        current = getattr(tree_math, name)
        original = getattr(current, "__wrapped__", current)  # fastpaths may have memoized it
        require_library_source(original, _AUDITED[name], "resolution")
    _resolve._kalandra_fast = True  # type: ignore[attr-defined]
    RatchetTree.resolve = _resolve  # type: ignore[method-assign]
    RatchetTree.resolve_indices = _resolve_indices  # type: ignore[method-assign]
    RatchetTree.merge_update_path = _merge_update_path  # type: ignore[method-assign]


# --- Commit ----------------------------------------------------------------------------------

_library_commit_deserialize = Commit.deserialize
_MEMO_FROM = 16 * 1024  # smaller commits decode in well under a millisecond
_last_commit: tuple[bytes, Commit] | None = None


def _copy_commit(commit: Commit) -> Commit:
    path = commit.path
    if path is not None:
        path = UpdatePath(
            path.leaf_node,
            [UpdatePathNode(n.encryption_key, list(n.encrypted_path_secrets)) for n in path.nodes],
        )
    return Commit(list(commit.proposals), path)


def _commit_deserialize(cls: type[Commit], data: bytes) -> Commit:
    global _last_commit
    last = _last_commit
    if last is not None and type(data) is bytes and data == last[0]:
        return _copy_commit(last[1])
    commit = _library_commit_deserialize(data)
    if len(data) >= _MEMO_FROM:
        # Remembered under its own encoding: a decode of exactly those bytes gives this value.
        # (``data`` may run on past the commit, as in FramedContent.deserialize.)
        encoding = commit.serialize()
        if data[: len(encoding)] == encoding:
            _last_commit = (encoding, _copy_commit(commit))
    return commit


library_commit_deserialize = _library_commit_deserialize  # for tests


def _replace_commit_codec() -> None:
    if getattr(Commit.deserialize, "_kalandra_fast", False):
        return
    require_library_source(Commit.deserialize, _AUDITED["Commit.deserialize"], "Commit decode")
    _commit_deserialize._kalandra_fast = True  # type: ignore[attr-defined]
    Commit.deserialize = classmethod(_commit_deserialize)  # type: ignore[method-assign,assignment]


def apply() -> None:
    """Install these speed fixes (idempotent); ``fastpaths.apply`` calls it."""
    _replace_verify()
    _replace_hashing()
    _replace_resolve()
    _replace_commit_codec()
