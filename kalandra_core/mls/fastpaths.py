"""Speed fixes for rfc9420 1.3.0 in large groups: same results, less work.

These are not corrections (the library computes the right thing), they remove quadratic costs
that make a 10,000-member group unusable (docs/performance-targets.md). Each replacement first
checks that the library code it replaces is the audited 1.3.0 source (LibraryChangedError
otherwise), like the corrections in ``_lib`` and ``corrections``.

* TLS readers: ``read_uint8`` and its siblings check the remaining length with
  ``len(buf[offset:])``, which copies the rest of the buffer on every field read. Loading a
  state or a ratchet tree of N leaves reads O(N) fields from an O(N) buffer: quadratic. The
  replacements compare lengths without copying and raise the same errors.
* ``LeafNode.deserialize_partial`` slices off its remainder after every field, and the Welcome
  tree loader hands it the whole rest of the tree for each leaf: quadratic again. The
  replacement parses a window that holds any ordinary LeafNode first, and keeps the result
  only if it re-encodes to exactly the bytes it consumed; otherwise it parses the full buffer
  as before.
* The Welcome tree loader (``load_full_tree_from_welcome_bytes``) is the library's, except that
  it hands each LeafNode parser a window of the buffer, not a copy of all the rest of it.
  ``MLSGroup.from_welcome`` loads the same tree twice (once for the GroupInfo signers, once for
  the group); while joining, the second load copies the nodes of the first.
* Tree arithmetic (``tree_math``: left, right, parent, direct path, ...) is recomputed bit by
  bit at every step of every walk over the tree; the pure functions are memoized.
* ``parse_capabilities_data`` runs for every leaf in several whole-tree checks of each commit,
  on what is nearly always the same few bytes; results are memoized by those bytes.
* ``UpdatePathNode`` (de)serialization grew and cut one bytes object per encrypted path
  secret: quadratic for a commit that encrypts to thousands of members (the first commit after
  adding them without a path). The replacements give the same bytes and values (a malformed
  node raises the same error type, its message may name another offset).
* ``Welcome.deserialize`` cut one bytes object per EncryptedGroupSecrets (and three inside
  each): quadratic in the members a commit adds. The replacement reads at offsets.
* ``RatchetTree._hash_node`` (TreeHashInput, RFC 9420 §7.8) is rebuilt with fewer calls: the
  same input bytes, hashed by the same provider.
* ``LeafNode.serialize`` re-encodes the leaf for every tree hash, every saved state and every
  Welcome. LeafNode is a frozen dataclass, so its encoding is computed once per object.

* ``from_welcome`` checks the GroupInfo signature with each leaf's key until one verifies, each
  try hashing the GroupInfoTBS, which holds the whole tree; while joining, only the key of the
  GroupInfo's signer (RFC 9420 §12.4.3.1) is tried.

``fastcommit`` (installed by :func:`apply` too) holds those of a received commit and a join:
signature verification, hashing, resolutions and the Commit decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

from . import fastcommit
from ._lib import (
    LEAF_ENCODING_ATTR,
    CipherSuite,
    DefaultCryptoProvider,
    EncryptedGroupSecrets,
    InvalidSignatureError,
    LeafNode,
    MLSVersion,
    RatchetTree,
    RatchetTreeNode,
    RFC9420Error,
    UpdatePathNode,
    Welcome,
    library_modules,
    parse_capabilities_data,
    replace_audited,
    require_library_source,
    tls_codec,
    tree_math,
)

_AUDITED = {
    "read_uint8": "0dcecf2b916a3fed1a9565db44536dde95eb846b134b0ce0151db4129d5b83e0",
    "read_uint16": "9c6516d69208c2456be1846aaa1cf794fe3bc6251b0acda06bc1377d789ab640",
    "read_uint24": "682541d0f744c6668ff76cad69fa5a1ed1fa0817518744cd52a908df35f44c15",
    "read_uint32": "134e39b8086e1985266705c3ebd9bba28c2b020138c936b1f550d8b6e5bbce3a",
    "read_uint64": "abe7a4e9cfa7fd04e5ef9f1b65add526f510aefddc33521768a2bf6c2a4c3957",
    "read_vector": "af216e6facd6049306bea8bb054493ffc3917695f9d115e1f61886771d9bb40b",
    "read_varint": "2f55753919537e1527b058311be9ec6f549725ee3956ce10ade1462ee1a0b7bc",
    "_require_length": "896f87a5c9f9f98a35af62c7ebacc99e690d50654e9150afd5def71f5c6b522d",
    "LeafNode.deserialize_partial": (
        "e64254d27a3df705e05da1c3c316dcb69c6ceaea0e8e3ff4310bcb66ee12f2d3"
    ),
    "RatchetTree.load_full_tree_from_welcome_bytes": (
        "54034a03719e0065aecabfea70257eb6a93013e441bbb7877903989c47c7bcad"
    ),
    "log2": "312c6b56000cb26c17051b010e9442f90e8fa8bd9f2b476c1db292fa923a46aa",
    "level": "18e36a294eaf04c20c9b8d79eeb978606645077301c3a5e57d7cbf1cdcd30ff0",
    "node_width": "935d722cbf5a7855ee13a29b1f4c02df63819a74495730d7d9b0d322c5174681",
    "root": "75e275e7b4cdbbeb8a35bafac784e5517d0a2ffba26aa5f354b3338eb8e54327",
    "left": "c682a1552b5f2132200c967b2c91c995b182477dce8ef1f8d4a02df6aa7bf34e",
    "right": "abaf4ac69c4fb4e7cbf91d4f8aa99e819cf8730be4d019afb53e640a4da342ae",
    "parent": "91bf8465a4a31f0dde3a04d47992bda7d70cea5e689714447c487d8435262c34",
    "sibling": "e048965d5b2d51794d815a3212ebbaf8524227b9fcf175e4b8565ad900cb9737",
    "direct_path": "321daf8608fa4405b3e8814001dcc572928a27bc4ff5eaec4a3e6a2a6609b1ce",
    "copath": "57f4eebe5a4b5e7b2df7a319fe6edfc90a3399597a9290d333ed4172db13da2e",
    "parse_capabilities_data": "4d3dca7e00a32379fc1ac51b5a14adda873ff14e4e22469a4038ee37f8c1b12c",
    "UpdatePathNode.serialize": "9e00fa208e36d43ef5696143a891378ab9732ee407c142c5387454d4872eb604",
    "UpdatePathNode.deserialize": (
        "27e9f7fa065d6646e76ac7674f1088c42c6d5839f45910ec250bbe83dceaebfe"
    ),
    "Welcome.deserialize": "5975c41a48b0a129a6edeb72d5d74ae1ec62441868161ed3c6c2043c3f223698",
    "RatchetTree._hash_node": "7d61c8da1fd42b88b85b8942d9b9be9b69a54c1d8dc05d28a4e0c679affbbd89",
    "DefaultCryptoProvider.verify_with_label": (
        "dfd7e0c107a095702ef8233121ec3358cdd740348927adbdb11d7f7442d62f1b"
    ),
    "LeafNode.serialize": "8ee63616999f4c87f357bcdb191a5cfabd29d4ee562c79dd557c9e966bc7e52b",
}

_TLSDecodeError = tls_codec.TLSDecodeError


def _need(buf: Any, offset: int, need: int) -> None:
    # The library's check, _require_length(buf[offset:], need), without copying buf[offset:].
    have = max(len(buf) - offset, 0)
    if have < need:
        raise _TLSDecodeError(f"buffer too short: need {need}, have {have}")


def read_uint8(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_uint8"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 1)
    return buf[offset], offset + 1


def read_uint16(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_uint16"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 2)
    return int.from_bytes(buf[offset : offset + 2], "big"), offset + 2


def read_uint24(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_uint24"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 3)
    return (buf[offset] << 16) | (buf[offset + 1] << 8) | buf[offset + 2], offset + 3


def read_uint32(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_uint32"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 4)
    return int.from_bytes(buf[offset : offset + 4], "big"), offset + 4


def read_uint64(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_uint64"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 8)
    return int.from_bytes(buf[offset : offset + 8], "big"), offset + 8


_LENGTH_READERS = {1: read_uint8, 2: read_uint16, 3: read_uint24, 4: read_uint32}


def read_vector(buf: bytes, offset: int, length_bytes: int) -> tuple[bytes, int]:
    reader = _LENGTH_READERS.get(length_bytes)
    if reader is None:
        raise ValueError("length_bytes must be 1, 2, 3, or 4")
    if offset < 0:
        return _originals["read_vector"](buf, offset, length_bytes)  # type: ignore[no-any-return]
    length, offset = reader(buf, offset)
    _need(buf, offset, length)
    return buf[offset : offset + length], offset + length


def read_varint(buf: bytes, offset: int = 0) -> tuple[int, int]:
    if offset < 0:
        return _originals["read_varint"](buf, offset)  # type: ignore[no-any-return]
    _need(buf, offset, 1)
    first = buf[offset]
    prefix = first >> 6
    if prefix == 3:
        raise _TLSDecodeError("invalid variable-length integer prefix 11 (RFC 9420)")
    length = 1 << prefix
    available = len(buf) - offset
    if available < length:
        raise _TLSDecodeError(
            f"truncated varint at offset {offset}: need {length} bytes for encoded varint, "
            f"have {available}"
        )
    val = int.from_bytes(buf[offset : offset + length], "big")
    if length == 1:
        val &= 0x3F
    elif length == 2:
        val &= 0x3FFF
        if val < 0x40:
            raise _TLSDecodeError("varint minimum encoding required (value < 64 must use 1 byte)")
    else:  # length == 4 (prefix 2)
        val &= 0x3FFFFFFF
        if val < 0x4000:
            raise _TLSDecodeError(
                "varint minimum encoding required (value < 16384 must use 1 or 2 bytes)"
            )
    return val, offset + length


_READERS: dict[str, Callable[..., Any]] = {
    "read_uint8": read_uint8,
    "read_uint16": read_uint16,
    "read_uint24": read_uint24,
    "read_uint32": read_uint32,
    "read_uint64": read_uint64,
    "read_vector": read_vector,
    "read_varint": read_varint,
}
_originals: dict[str, Callable[..., Any]] = {}


def _rebind(original: Callable[..., Any], replacement: Callable[..., Any]) -> None:
    """Point every library module's reference to ``original`` at ``replacement``."""
    name = original.__name__
    for module in library_modules():
        if getattr(module, name, None) is original:
            setattr(module, name, replacement)


def _replace_readers() -> None:
    if _originals:
        return
    require_library_source(tls_codec._require_length, _AUDITED["_require_length"], "TLS readers")
    for name in _READERS:
        original = getattr(tls_codec, name)
        require_library_source(original, _AUDITED[name], "TLS readers")
        _originals[name] = original
    # Modules bound the readers by name at import: rebind each reference to the original.
    for module in library_modules():
        for name, fast in _READERS.items():
            if getattr(module, name, None) is _originals[name]:
                setattr(module, name, fast)


# --- LeafNode ----------------------------------------------------------------------------------

_WINDOW = 4096  # far larger than a LeafNode with a basic credential (about 300 bytes)
_library_leaf_partial = LeafNode.deserialize_partial
_library_leaf_serialize = LeafNode.serialize


def _leaf_serialize(self: LeafNode) -> bytes:
    cached = self.__dict__.get(LEAF_ENCODING_ATTR)
    if cached is None:
        cached = _library_leaf_serialize(self)
        object.__setattr__(self, LEAF_ENCODING_ATTR, cached)
    return cached


def _parse_window(window: bytes) -> tuple[LeafNode, int] | None:
    """The LeafNode at the start of ``window`` if it lies wholly inside it, else None."""
    try:
        leaf, consumed = _library_leaf_partial(window)
    except Exception:
        return None  # longer than the window (or malformed): the caller parses it all
    # A successful parse of a prefix read only those bytes; keep it only when they are exactly
    # the leaf's encoding, so the result cannot differ from a parse of the whole buffer.
    if consumed < len(window) and leaf.serialize() == window[:consumed]:
        return leaf, consumed
    return None


def _leaf_partial(data: bytes) -> tuple[LeafNode, int]:
    if len(data) > _WINDOW and (parsed := _parse_window(bytes(data[:_WINDOW]))) is not None:
        return parsed
    return _library_leaf_partial(data)


def _replace_leaf_codec() -> None:
    if getattr(LeafNode.serialize, "_kalandra_fast", False):
        return
    require_library_source(
        LeafNode.deserialize_partial, _AUDITED["LeafNode.deserialize_partial"], "LeafNode codec"
    )
    require_library_source(LeafNode.serialize, _AUDITED["LeafNode.serialize"], "LeafNode codec")
    _leaf_serialize._kalandra_fast = True  # type: ignore[attr-defined]
    LeafNode.serialize = _leaf_serialize  # type: ignore[method-assign]
    LeafNode.deserialize_partial = staticmethod(_leaf_partial)  # type: ignore[method-assign]


# --- the Welcome ratchet tree --------------------------------------------------------------------

_Entry = tuple[int, Any] | None


def _welcome_tree_entries(data: bytes) -> list[_Entry]:
    """The library's parse of ``optional<Node> ratchet_tree<V>``, windowed (see the module doc)."""
    off = 0
    total_len, off = read_varint(data, off)
    end = off + total_len
    if end > len(data):
        raise _TLSDecodeError("ratchet_tree extension shorter than declared length")
    entries: list[_Entry] = []
    while off < end:
        opt_len, off = read_uint8(data, off)
        if opt_len == 0:
            entries.append(None)
            continue
        if opt_len != 1:
            raise _TLSDecodeError("optional<Node> must have length 0 or 1")
        node_type, off = read_uint8(data, off)
        if node_type == 1:
            leaf_node, consumed = _leaf_partial_at(data, off)
            off += consumed
            entries.append((1, leaf_node))
        elif node_type == 2:
            pk, off = tls_codec.read_opaque_varint(data, off)
            ph, off = tls_codec.read_opaque_varint(data, off)
            ul_len, off = read_varint(data, off)
            ul_end = off + ul_len
            if ul_end > len(data):
                raise _TLSDecodeError("unmerged_leaves<V> extends past ratchet_tree buffer")
            if ul_len % 4 != 0:
                raise _TLSDecodeError("unmerged_leaves<V> length must be a multiple of 4 (uint32)")
            unmerged: list[int] = []
            while off < ul_end:
                value, off = read_uint32(data, off)
                unmerged.append(value)
            entries.append((2, (pk, ph, unmerged)))
        else:
            raise _TLSDecodeError(f"invalid NodeType {node_type}")
    return entries


def _leaf_partial_at(data: bytes, off: int) -> tuple[LeafNode, int]:
    window = data[off : off + _WINDOW]
    if len(window) < _WINDOW:  # the window is all the rest
        return _library_leaf_partial(window)
    parsed = _parse_window(window)
    return parsed if parsed is not None else _library_leaf_partial(data[off:])


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection inside: decoding, hashing or saving a 10,000-leaf tree allocates
    some 100,000 objects that are not cyclic garbage, and the collections they would trigger
    walk the whole heap (of a process holding many groups) for nothing. Collection resumes
    after, if it was on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# from_welcome loads the GroupInfo's tree twice: while joining, remember the last one loaded.
_JOIN_TREE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "kalandra_join_tree", default=None
)


@contextlib.contextmanager
def joining() -> Iterator[None]:
    """While joining, a tree loaded twice from the same bytes is parsed and hashed once."""
    token = _JOIN_TREE.set([])
    try:
        yield
    finally:
        _JOIN_TREE.reset(token)


def _load_welcome_tree(self: RatchetTree, data: bytes) -> None:
    memo = _JOIN_TREE.get()
    if memo and memo[0] == data:
        self._n_leaves = memo[1]
        self._nodes.clear()
        for index, fields in memo[2].items():
            node = RatchetTreeNode(index % 2 == 0)
            (node.public_key, node.parent_hash, node.leaf_node, node.hash, unmerged) = fields
            node.unmerged_leaves = list(unmerged)
            self._nodes[index] = node
        return
    _load_welcome_tree_uncached(self, data)
    if memo is not None:
        memo[:] = [
            data,
            self._n_leaves,
            {
                index: (n.public_key, n.parent_hash, n.leaf_node, n.hash, list(n.unmerged_leaves))
                for index, n in self._nodes.items()
            },
        ]


def _load_welcome_tree_uncached(self: RatchetTree, data: bytes) -> None:
    entries = _welcome_tree_entries(data) if read_varint(data, 0)[0] else []
    self._nodes.clear()
    if not entries:
        self._n_leaves = 0
        return
    # As the library: extend with blanks to 2^(d+1)-1 nodes, n_leaves = 2^d.
    d = 0
    while (1 << (d + 1)) - 1 < len(entries):
        d += 1
    width = (1 << (d + 1)) - 1
    self._n_leaves = 1 << d
    for i in range(width):
        self._nodes[i] = RatchetTreeNode(is_leaf=(i % 2 == 0))
    for idx, entry in enumerate(entries):
        if entry is None:
            continue
        node_type, payload = entry
        node = self._nodes[idx]
        if node_type == 1:
            node.public_key = payload.encryption_key
            node.leaf_node = payload
        else:
            pk, ph, unmerged = payload
            node.public_key = pk if pk else None
            node.parent_hash = ph if ph else None
            node.unmerged_leaves = list(unmerged) if unmerged else []
    self._ensure_hash_bottom_up(tree_math.root(self._n_leaves))


library_welcome_tree_loader = RatchetTree.load_full_tree_from_welcome_bytes  # for tests

# from_welcome checks the GroupInfo signature with every leaf's key in turn until one verifies.
# The signed GroupInfoTBS holds the whole ratchet tree (megabytes at 10,000 members), so each
# failed try hashes all of it: a Welcome from a committer at leaf 9,999 took a minute to join.
# RFC 9420 §12.4.3.1 takes the key from the leaf of the GroupInfo's signer (the TBS ends with
# its index), so while joining, any other key is refused without verifying.
_library_verify_with_label = DefaultCryptoProvider.verify_with_label


def _verify_with_label(
    self: DefaultCryptoProvider, public_key: bytes, label: bytes, content: bytes, signature: bytes
) -> None:
    memo = _JOIN_TREE.get()
    if memo and label == b"GroupInfoTBS" and len(content) >= 4:
        fields = memo[2].get(int.from_bytes(content[-4:], "big") * 2)
        signer = fields[2] if fields is not None else None  # the signer's LeafNode
        if signer is not None and public_key != signer.signature_key:
            raise InvalidSignatureError("not the key of the GroupInfo's signer")
    _library_verify_with_label(self, public_key, label, content, signature)


library_verify_with_label = _library_verify_with_label  # for tests


def _replace_verify_with_label() -> None:
    replace_audited(
        DefaultCryptoProvider,
        "verify_with_label",
        _verify_with_label,
        _AUDITED["DefaultCryptoProvider.verify_with_label"],
        "GroupInfo signer's key",
    )


def _replace_welcome_tree_loader() -> None:
    replace_audited(
        RatchetTree,
        "load_full_tree_from_welcome_bytes",
        _load_welcome_tree,
        _AUDITED["RatchetTree.load_full_tree_from_welcome_bytes"],
        "Welcome tree loader",
    )


# --- tree arithmetic and capabilities ----------------------------------------------------------

_INT_TREE_MATH = ("log2", "level", "node_width", "root", "left", "right", "parent", "sibling")
_LIST_TREE_MATH = ("direct_path", "copath")
_MEMO_SIZE = 1 << 15  # a node per entry: a 16,384-leaf tree's parent nodes fit; a few MB at most


def _memo_list(fn: Callable[..., list[int]]) -> Callable[..., list[int]]:
    cached = functools.lru_cache(maxsize=_MEMO_SIZE)(lambda *args: tuple(fn(*args)))

    @functools.wraps(fn)
    def memoized(*args: int) -> list[int]:
        return list(cached(*args))  # a new list each time: callers may change theirs

    return memoized


def _replace_tree_math() -> None:
    if getattr(tree_math.right, "_kalandra_fast", False):
        return
    for name in (*_INT_TREE_MATH, *_LIST_TREE_MATH):
        require_library_source(getattr(tree_math, name), _AUDITED[name], "tree arithmetic")
    for name in (*_INT_TREE_MATH, *_LIST_TREE_MATH):
        original = getattr(tree_math, name)
        fast: Any = (
            functools.wraps(original)(functools.lru_cache(maxsize=_MEMO_SIZE)(original))
            if name in _INT_TREE_MATH
            else _memo_list(original)
        )
        fast._kalandra_fast = True
        _rebind(original, fast)


_library_parse_capabilities: Callable[..., Any] = parse_capabilities_data
_capabilities_memo: dict[bytes, dict[str, Any]] = {}


def _parse_capabilities(data: bytes, return_consumed: bool = False) -> Any:
    if type(data) is not bytes:  # the memo's keys must be bytes (hashable, immutable)
        return _library_parse_capabilities(data, return_consumed)
    if return_consumed:
        # Parsing a LeafNode: ``data`` runs on past the capabilities. Their five vectors end at
        # ``end``; the parse depends on those bytes only, so they are the memo's key.
        end = _capabilities_end(data)
        if end is None:
            return _library_parse_capabilities(data, True)
        key = data[:end]
        parsed = _capabilities_memo.get(key)
        if parsed is None:
            parsed, consumed = _library_parse_capabilities(data, True)
            if consumed != end:  # not the five-vector form: leave it to the library each time
                return parsed, consumed
            _remember_capabilities(key, parsed)
        return _copy_capabilities(parsed), end
    if len(data) > 1024:
        return _library_parse_capabilities(data)
    parsed = _capabilities_memo.get(data)
    if parsed is None:
        parsed = _library_parse_capabilities(data)
        _remember_capabilities(data, parsed)
    return _copy_capabilities(parsed)


def _capabilities_end(data: bytes) -> int | None:
    off = 0
    try:
        for _ in range(5):
            length, off = read_varint(data, off)
            off += length
    except Exception:
        return None
    return off if off <= min(len(data), 1024) else None


def _remember_capabilities(key: bytes, parsed: dict[str, Any]) -> None:
    if len(_capabilities_memo) >= 1024:
        _capabilities_memo.clear()
    _capabilities_memo[key] = parsed


def _copy_capabilities(parsed: dict[str, Any]) -> dict[str, Any]:
    # A copy, lists included: callers own what they get.
    return {key: list(v) if isinstance(v, list) else v for key, v in parsed.items()}


def _replace_capabilities_parser() -> None:
    if getattr(_parse_capabilities, "_kalandra_fast", False):
        return
    require_library_source(
        parse_capabilities_data, _AUDITED["parse_capabilities_data"], "capabilities memo"
    )
    _parse_capabilities._kalandra_fast = True  # type: ignore[attr-defined]
    _rebind(parse_capabilities_data, _parse_capabilities)


# --- UpdatePathNode ------------------------------------------------------------------------------


def _path_node_serialize(self: UpdatePathNode) -> bytes:
    secrets = b"".join(self.encrypted_path_secrets)
    return (
        tls_codec.write_opaque_varint(self.encryption_key)
        + tls_codec.write_varint(len(secrets))
        + secrets
    )


def _path_node_deserialize(cls: type[UpdatePathNode], data: bytes) -> UpdatePathNode:
    encryption_key, off = tls_codec.read_opaque_varint(data, 0)
    eps_len, off = read_varint(data, off)
    eps_data = data[off : off + eps_len]  # as the library: a short vector is cut, not refused
    secrets: list[bytes] = []
    pos, size = 0, len(eps_data)
    read = tls_codec.read_opaque_varint
    while pos < size:
        # HPKECiphertext { opaque kem_output<V>; opaque ciphertext<V>; }: both lengths are
        # one-byte varints (< 64) for the suites we use; read those inline, others as before.
        kem_len = eps_data[pos]
        after_kem = pos + 1 + kem_len
        if kem_len < 0x40 and after_kem < size:
            ct_len = eps_data[after_kem]
            end = after_kem + 1 + ct_len
            if ct_len < 0x40 and end <= size:
                secrets.append(eps_data[pos:end])
                pos = end
                continue
        _, after_kem = read(eps_data, pos)
        _, end = read(eps_data, after_kem)
        secrets.append(eps_data[pos:end])
        pos = end
    return cls(encryption_key, secrets)


library_path_node_serialize = UpdatePathNode.serialize  # for tests
library_path_node_deserialize = UpdatePathNode.deserialize


def _replace_path_node_codec() -> None:
    if getattr(UpdatePathNode.serialize, "_kalandra_fast", False):
        return
    for name in ("serialize", "deserialize"):
        require_library_source(
            getattr(UpdatePathNode, name), _AUDITED[f"UpdatePathNode.{name}"], "UpdatePathNode"
        )
    _path_node_serialize._kalandra_fast = True  # type: ignore[attr-defined]
    UpdatePathNode.serialize = _path_node_serialize  # type: ignore[method-assign]
    UpdatePathNode.deserialize = classmethod(_path_node_deserialize)  # type: ignore[method-assign,assignment]


# --- Welcome -------------------------------------------------------------------------------------


def _welcome_deserialize(cls: type[Welcome], data: bytes) -> Welcome:
    cipher_suite = CipherSuite.deserialize(data[:2])
    secrets_len, off = read_varint(data, 2)
    if len(data) - off < secrets_len:
        raise RFC9420Error("Welcome secrets vector shorter than declared length")
    end = off + secrets_len
    read = tls_codec.read_opaque_varint
    block = data[:end]  # as the library, entries are read from the secrets vector alone
    secrets: list[EncryptedGroupSecrets] = []
    while off < end:
        new_member, off = read(block, off)
        kem, off = read(block, off)
        ct, off = read(block, off)
        secrets.append(EncryptedGroupSecrets(new_member, kem, ct))
    encrypted_group_info, _ = read(data, end)
    return cls(MLSVersion.MLS10, cipher_suite, secrets, encrypted_group_info)


library_welcome_deserialize = Welcome.deserialize  # for tests


def _replace_welcome_codec() -> None:
    if getattr(Welcome.deserialize, "_kalandra_fast", False):
        return
    require_library_source(Welcome.deserialize, _AUDITED["Welcome.deserialize"], "Welcome codec")
    _welcome_deserialize._kalandra_fast = True  # type: ignore[attr-defined]
    Welcome.deserialize = classmethod(_welcome_deserialize)  # type: ignore[method-assign,assignment]


# --- tree hash ---------------------------------------------------------------------------------


def _opaque_v(data: bytes) -> bytes:
    return tls_codec.write_varint(len(data)) + data


def _hash_node(self: RatchetTree, node_index: int) -> None:
    node = self.get_node(node_index)
    if node.is_leaf:
        # LeafNodeHashInput: uint32 leaf_index; optional<LeafNode> leaf_node
        head = b"\x01" + (node_index // 2).to_bytes(4, "big")
        leaf = node.leaf_node
        blob = head + b"\x01" + leaf.serialize() if leaf else head + b"\x00"
    else:
        # ParentNodeHashInput: optional<ParentNode> parent_node; left_hash<V>; right_hash<V>
        left = self.get_node(tree_math.left(node_index)).hash or b""
        right = self.get_node(tree_math.right(node_index, self.n_leaves)).hash or b""
        if node.public_key:
            unmerged = b"".join(leaf.to_bytes(4, "big") for leaf in sorted(node.unmerged_leaves))
            parent = (
                b"\x01"
                + _opaque_v(node.public_key)
                + _opaque_v(node.parent_hash or b"")
                + _opaque_v(unmerged)
            )
        else:
            parent = b"\x00"
        blob = b"\x02" + parent + _opaque_v(left) + _opaque_v(right)
    node.hash = self._crypto_provider.hash(blob)


library_hash_node = RatchetTree._hash_node  # for tests


def _replace_hash_node() -> None:
    replace_audited(
        RatchetTree,
        "_hash_node",
        _hash_node,
        _AUDITED["RatchetTree._hash_node"],
        "tree hash input",
    )


def apply() -> None:
    """Install the speed fixes (idempotent); the package does it on import."""
    fastcommit.apply()
    _replace_hash_node()
    _replace_welcome_codec()
    _replace_path_node_codec()
    _replace_readers()
    _replace_leaf_codec()
    _replace_welcome_tree_loader()
    _replace_tree_math()
    _replace_capabilities_parser()
    _replace_verify_with_label()


apply()
