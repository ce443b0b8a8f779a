"""The one place that imports ``rfc9420`` (pinned 1.3.0), plus our corrections of it.

Everything else in the project goes through this module, so a library upgrade is reviewed here.
Each correction first checks that the code it works around is still byte-for-byte the audited
1.3.0 source and raises :class:`LibraryChangedError` otherwise: a silently changed library could
make a correction wrong (or double-apply a fix upstream already made).

Corrections and gap fills so far (defect numbers as in docs/mls-library.md):

* defect 4, exporter: ``KeySchedule.export`` feeds the exporter Context unhashed; RFC 9420 §8.5
  says ``ExpandWithLabel(DeriveSecret(exporter_secret, Label), "exported", Hash(Context), L)``.
  :func:`mls_exporter` is the RFC form and ``KeySchedule.export`` is patched to use it, so
  ``MLSGroup.export_secret`` is correct too.
* out-of-band ratchet tree: ``MLSGroup.from_welcome`` only reads the tree from the GroupInfo
  ``ratchet_tree`` extension; without it the joiner gets an empty tree and the GroupInfo signature
  is never checked. :func:`join_from_welcome` installs and validates a tree given separately.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import rfc9420
from rfc9420.backends.crypto.default_hpke import DefaultCryptoProvider
from rfc9420.codec import tls as tls_codec
from rfc9420.codec.tls import read_varint, write_opaque_varint, write_varint
from rfc9420.crypto import labels as mls_labels
from rfc9420.crypto.ciphersuites import SignatureScheme
from rfc9420.crypto.crypto_provider import CryptoProvider
from rfc9420.crypto.hpke_labels import decrypt_with_label, encrypt_with_label
from rfc9420.extensions.extensions import (
    Extension,
    ExtensionType,
    build_capabilities_data,
    deserialize_extensions,
    parse_capabilities_data,
    parse_external_senders,
    serialize_extensions,
)
from rfc9420.group.mls_group import processing
from rfc9420.group.mls_group.processing import MLSGroup, PendingCommit
from rfc9420.messages.data_structures import (
    AddProposal,
    CipherSuite,
    Commit,
    Credential,
    EncryptedGroupSecrets,
    ExternalInitProposal,
    GroupContext,
    GroupContextExtensionsProposal,
    GroupInfo,
    GroupSecrets,
    MLSVersion,
    PreSharedKeyID,
    PreSharedKeyProposal,
    Proposal,
    ProposalOrRefType,
    PSKType,
    ReInitProposal,
    RemoveProposal,
    Sender,
    SenderType,
    Signature,
    UpdatePath,
    UpdatePathNode,
    UpdateProposal,
    Welcome,
)
from rfc9420.messages.key_packages import KeyPackage, LeafNode, LeafNodeSource
from rfc9420.messages.messages import (
    AuthenticatedContent,
    AuthenticatedContentTBS,
    ContentType,
    FramedContent,
    FramedContentAuthData,
    MLSCiphertext,
    MLSMessage,
    MLSPlaintext,
    WireFormat,
    attach_membership_tag,
    derive_psk_secret,
    protect_content_application,
    protect_content_handshake,
    sign_application_framed_content,
    sign_authenticated_content,
    unprotect_content_application,
    unprotect_content_handshake,
    verify_plaintext,
)
from rfc9420.messages.refs import encode_ref_hash_input, make_key_package_ref, make_proposal_ref
from rfc9420.mls.exceptions import InvalidSignatureError, RFC9420Error
from rfc9420.protocol.schedule.key_schedule import KeySchedule
from rfc9420.protocol.transcripts import TranscriptState
from rfc9420.protocol.tree import tree_math
from rfc9420.protocol.tree.ratchet_tree import RatchetTree, RatchetTreeNode
from rfc9420.protocol.tree.ratchet_tree_backend import RatchetTreeBackend, create_tree_backend
from rfc9420.protocol.tree.secret_tree import SecretTree
from rfc9420.protocol.validations import (
    validate_confirmation_tag,
    validate_tree_leaf_key_uniqueness,
)
from rfc9420.providers.crypto import CryptoProviderProtocol

__all__ = [
    "LEAF_ENCODING_ATTR",
    "PINNED_VERSION",
    "AddProposal",
    "AuthenticatedContent",
    "AuthenticatedContentTBS",
    "CipherSuite",
    "Commit",
    "ContentType",
    "Credential",
    "CryptoProvider",
    "DefaultCryptoProvider",
    "EncryptedGroupSecrets",
    "Extension",
    "ExtensionType",
    "ExternalInitProposal",
    "FramedContent",
    "FramedContentAuthData",
    "GroupContext",
    "GroupContextExtensionsProposal",
    "GroupInfo",
    "GroupSecrets",
    "InvalidSignatureError",
    "KeyPackage",
    "KeySchedule",
    "LeafNode",
    "LeafNodeSource",
    "LibraryChangedError",
    "MLSCiphertext",
    "MLSGroup",
    "MLSMessage",
    "MLSPlaintext",
    "MLSVersion",
    "PSKType",
    "PendingCommit",
    "PreSharedKeyID",
    "PreSharedKeyProposal",
    "Proposal",
    "ProposalOrRefType",
    "RFC9420Error",
    "RatchetTree",
    "RatchetTreeNode",
    "ReInitProposal",
    "RemoveProposal",
    "SecretTree",
    "Sender",
    "SenderType",
    "Signature",
    "SignatureScheme",
    "TranscriptState",
    "UnsupportedMessageError",
    "UpdatePath",
    "UpdatePathNode",
    "UpdateProposal",
    "Welcome",
    "WireFormat",
    "attach_membership_tag",
    "build_capabilities_data",
    "cached_proposal",
    "create_tree_backend",
    "crypto_for_suite",
    "decrypt_with_label",
    "derive_psk_secret",
    "deserialize_extensions",
    "encode_ref_hash_input",
    "encrypt_with_label",
    "group_context",
    "group_crypto",
    "group_exporter",
    "group_key_schedule",
    "group_secret_tree",
    "group_tree",
    "join_from_welcome",
    "key_schedule_from_secrets",
    "library_modules",
    "make_key_package_ref",
    "make_proposal_ref",
    "mls_exporter",
    "mls_labels",
    "open_welcome",
    "parse_capabilities_data",
    "parse_external_senders",
    "pending_proposals",
    "process_handshake",
    "processing",
    "protect_content_application",
    "protect_content_handshake",
    "read_varint",
    "require_library_source",
    "serialize_extensions",
    "sign_application_framed_content",
    "sign_authenticated_content",
    "tls_codec",
    "tree_math",
    "unprotect_content_application",
    "unprotect_content_handshake",
    "validate_confirmation_tag",
    "verify_plaintext",
    "write_opaque_varint",
    "write_varint",
]

PINNED_VERSION = "1.3.0"


class LibraryChangedError(RuntimeError):
    """The installed rfc9420 is not the release our corrections were written against."""


class UnsupportedMessageError(ValueError):
    """A message this layer cannot process yet (reported, never silently skipped)."""


def _check_version() -> None:
    dist = importlib.metadata.version("rfc9420")
    attr = getattr(rfc9420, "__version__", None)
    if dist != PINNED_VERSION or attr != PINNED_VERSION:
        raise LibraryChangedError(
            f"rfc9420 changed: found {dist} (module says {attr}), corrections in "
            f"kalandra_core.mls._lib were written for {PINNED_VERSION} and need review"
        )


# sha256 of inspect.getsource() of each rfc9420 function a correction depends on, in 1.3.0.
_AUDITED_SOURCES = {
    "KeySchedule.export": "0a6503756d7ce849620fa7efb16d191f8ac28f65d71d068e4af1bf50319ea107",
    "MLSGroup.export_secret": "f7c8e699a33468c8b927943cb71e9f95cb2987c964f1b38ff73db465567053ee",
    "MLSGroup.from_welcome": "34adb3223327f566e48da0f5ffade25aa45713df4246b6399ac364865700b524",
    "RatchetTree.serialize_full_state": (
        "95ba16b0c7886535fd64460a537e77cf37a445b6cb07da8ab31e72eddd85bc92"
    ),
    "RatchetTree.load_full_state": (
        "ea2d61aa9aefabcc2ede1cf685bf464e926c6ebc0936cd94fbf66f5098a1df9d"
    ),
    "RatchetTree._compute_parent_hash_for_leaf": (
        "2f8cded30df664f35670484265c3aa4585babeacd765f1d87e78500737146b6a"
    ),
    # Send-side corrections (corrections.py) and the flows group.py drives.
    "RatchetTree.create_update_path": (
        "ec71f6020b738e3e4a3bb5d0d19bfe8ac0cf523c5a118cfe9d20765335cf2c5d"
    ),
    "MLSGroup.process_commit": "f7db4dd55f3f04a47c2e561bb5b1d40d3ad1c2b2d0419070eeef5af6afa4fdbc",
    "MLSGroup.create_commit": "6c5f60e558912a9996222b9b5812489dfa6f44864ad7e6fbd6f78b5c17d24bf7",
    "MLSGroup.apply_own_commit": (
        "2e85532aa24e06211aca83e8559390544b0a640aeeb5b58bfe88d83f12d95b38"
    ),
    "MLSGroup.external_commit": "3e35097451c1a7f670718367615c1bfe30857eade3ffd8c1d88778e022aecdbc",
    "MLSGroup.process_external_commit": (
        "bbea6646aa3a29673a42a936ed196d1a0fa9cd0dc629b05ce4711b7ba1d0f871"
    ),
}


def _require_audited(func: Callable[..., object], correction: str) -> None:
    name = func.__qualname__
    digest = hashlib.sha256(inspect.getsource(func).encode()).hexdigest()
    if digest != _AUDITED_SOURCES[name]:
        raise LibraryChangedError(
            f"rfc9420 changed: correction {correction!r} needs review "
            f"({name} is not the audited {PINNED_VERSION} source)"
        )


def require_library_source(func: Callable[..., object], digest: str, change: str) -> None:
    """Raise LibraryChangedError unless ``func`` is the audited source (sha256 ``digest``)."""
    if hashlib.sha256(inspect.getsource(func).encode()).hexdigest() != digest:
        raise LibraryChangedError(
            f"rfc9420 changed: {change!r} needs review "
            f"({func.__qualname__} is not the audited {PINNED_VERSION} source)"
        )


def replace_audited(
    owner: type, name: str, replacement: Callable[..., Any], digest: str, change: str
) -> None:
    """Put ``replacement`` in place of ``owner.name``, once, if that is still the audited
    source (sha256 ``digest``; see :func:`require_library_source`)."""
    current = getattr(owner, name)
    if getattr(current, "_kalandra_fast", False):
        return
    require_library_source(current, digest, change)
    replacement._kalandra_fast = True  # type: ignore[attr-defined]
    setattr(owner, name, replacement)


def library_modules() -> list[ModuleType]:
    """The loaded modules of rfc9420 (to rebind a function every module imported by name)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "rfc9420" or name.startswith("rfc9420."))
    ]


_check_version()


# --- defect 4: MLS-Exporter ------------------------------------------------------------------


def mls_exporter(
    crypto: CryptoProvider, exporter_secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """MLS-Exporter(Label, Context, Length) exactly as RFC 9420 §8.5 (Context is hashed)."""
    secret = crypto.derive_secret(exporter_secret, label)
    return crypto.expand_with_label(secret, b"exported", crypto.hash(context), length)


def group_exporter(group: MLSGroup, label: bytes, context: bytes, length: int) -> bytes:
    """RFC-correct exporter of a group's current epoch."""
    return mls_exporter(
        group._crypto_provider, group.get_exporter_secret(), label, context, length
    )


def _key_schedule_export(self: KeySchedule, label: bytes, context: bytes, length: int) -> bytes:
    return mls_exporter(self._crypto_provider, self.exporter_secret, label, context, length)


def _correct_exporter() -> None:
    if getattr(KeySchedule.export, "_kalandra_corrected", False):
        return
    _require_audited(KeySchedule.export, "defect 4 (exporter context)")
    # export_secret only delegates to KeySchedule.export; if it changes, the patch may not apply.
    _require_audited(MLSGroup.export_secret, "defect 4 (exporter context)")
    _key_schedule_export._kalandra_corrected = True  # type: ignore[attr-defined]
    KeySchedule.export = _key_schedule_export  # type: ignore[method-assign]


_correct_exporter()


# --- crypto ------------------------------------------------------------------------------------


def crypto_for_suite(suite: int) -> DefaultCryptoProvider:
    """A fresh provider: DefaultCryptoProvider holds mutable suite state, so never share one."""
    return DefaultCryptoProvider(suite)


def key_schedule_from_secrets(
    crypto: CryptoProvider, *, sender_data_secret: bytes, membership_key: bytes
) -> KeySchedule:
    """A KeySchedule holding given secrets, for vectors that give secrets and not epoch_secret.

    Built the way ``KeySchedule.from_epoch_secret`` builds one, so the library's own methods
    (sender-data keys from a ciphertext sample, ...) run on it unchanged.
    """
    ks: KeySchedule = object.__new__(KeySchedule)
    ks._crypto_provider = crypto
    ks._wiped = False
    ks._sender_data_secret = sender_data_secret
    ks._membership_key = membership_key
    return ks


# --- joining -----------------------------------------------------------------------------------


def open_welcome(
    crypto: CryptoProvider,
    welcome: Welcome,
    key_package: KeyPackage,
    init_priv: bytes,
    psks: Mapping[bytes, bytes],
) -> tuple[GroupSecrets, GroupInfo, bytes | None]:
    """Decrypt our GroupSecrets and the GroupInfo (RFC 9420 §12.4.3.1).

    Returns the secrets, the GroupInfo and the psk_secret (None without PSKs).
    """
    ref = make_key_package_ref(crypto, key_package.serialize())
    mine = [egs for egs in welcome.secrets if egs.new_member == ref]
    if len(mine) != 1:
        raise ValueError("Welcome has no EncryptedGroupSecrets for our KeyPackage")
    secrets = GroupSecrets.deserialize(
        decrypt_with_label(
            crypto,
            init_priv,
            mine[0].kem_output,
            mls_labels.HPKE_WELCOME,
            welcome.encrypted_group_info,
            b"",
            mine[0].ciphertext,
        )
    )
    psk_secret: bytes | None = None
    if secrets.psks:
        values: list[bytes | None] = [_psk_value(psks, pid) for pid in secrets.psks]
        psk_secret = derive_psk_secret(crypto, secrets.psks, psk_values=values)
    hash_len = crypto.kdf_hash_len()
    member_secret = crypto.kdf_extract(secrets.joiner_secret, psk_secret or bytes(hash_len))
    welcome_secret = crypto.derive_secret(member_secret, b"welcome")
    key = crypto.expand_with_label(welcome_secret, b"key", b"", crypto.aead_key_size())
    nonce = crypto.expand_with_label(welcome_secret, b"nonce", b"", crypto.aead_nonce_size())
    info = GroupInfo.deserialize(
        crypto.aead_decrypt(key, nonce, welcome.encrypted_group_info, b"")
    )
    return secrets, info, psk_secret


def _psk_value(psks: Mapping[bytes, bytes], pid: PreSharedKeyID) -> bytes | None:
    if pid.psktype != PSKType.EXTERNAL or pid.psk_id is None:
        return None
    return psks.get(pid.psk_id)


# from_welcome also demands that every leaf's stored parent_hash equal one recomputed from its
# current direct path. RFC 9420 §7.9.2 asks only that each parent node be parent-hash valid
# (verify_parent_hash_chains, which from_welcome runs too): a later commit legitimately
# rewrites nodes on an earlier committer's path, so valid trees were rejected after two
# updates by different members. While joining, the per-leaf check compares the leaf with
# itself; the chain check still covers every parent node.
_WELCOME_LEAF_PARENT_HASH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "welcome_leaf_parent_hash", default=False
)
_library_leaf_parent_hash = RatchetTree._compute_parent_hash_for_leaf


def _leaf_parent_hash(self: RatchetTree, leaf_index: int) -> bytes:
    if _WELCOME_LEAF_PARENT_HASH.get():
        node = self.get_node(leaf_index * 2).leaf_node
        if node is not None and node.parent_hash:
            return bytes(node.parent_hash)
    return _library_leaf_parent_hash(self, leaf_index)


def _correct_welcome_leaf_check() -> None:
    if getattr(RatchetTree._compute_parent_hash_for_leaf, "_kalandra_corrected", False):
        return
    _require_audited(MLSGroup.from_welcome, "Welcome leaf parent_hash check")
    _require_audited(RatchetTree._compute_parent_hash_for_leaf, "Welcome leaf parent_hash check")
    _leaf_parent_hash._kalandra_corrected = True  # type: ignore[attr-defined]
    RatchetTree._compute_parent_hash_for_leaf = _leaf_parent_hash  # type: ignore[method-assign]


_correct_welcome_leaf_check()


# Unmerged leaves are part of every parent node (and of its tree hash), but the library's tree
# state (serialize_full_state / load_full_state) drops them. create_commit clones the tree that
# way, and saved groups go through it, so after an Add without a path, the next commit of a
# member whose tree went through a clone or a reload disagreed with everyone's tree hash
# ("invalid confirmation tag"). The corrected pair carries them in a prefix block.
# Where fastpaths' LeafNode.serialize keeps a leaf's encoding (LeafNode is a frozen dataclass).
LEAF_ENCODING_ATTR = "_kalandra_encoding"
_UNMERGED_MAGIC = b"\xffKALUL1\x00"
_library_serialize_tree = RatchetTree.serialize_full_state  # tests compare _tree_state with it
_library_load_tree = RatchetTree.load_full_state


def _serialize_tree(self: RatchetTree) -> bytes:
    entries = sorted(
        (index, sorted(node.unmerged_leaves))
        for index, node in self._nodes.items()
        if node.unmerged_leaves and not node.is_leaf
    )
    block = len(entries).to_bytes(4, "big") + b"".join(
        index.to_bytes(4, "big")
        + len(leaves).to_bytes(4, "big")
        + b"".join(leaf.to_bytes(4, "big") for leaf in leaves)
        for index, leaves in entries
    )
    return _UNMERGED_MAGIC + len(block).to_bytes(4, "big") + block + _tree_state(self)


def _opaque16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data  # write_opaque16 (it raises past 2^16 too)


def _tree_state(self: RatchetTree) -> bytes:
    """The library's serialize_full_state, byte for byte, in linear time (it grew one bytes
    object with +=, quadratic in the tree size). Each node's encoding is kept on the node with
    the field values it was made from, and reused while they are the same objects: a group
    saves its whole state after every commit, which changes a path of nodes, not 10,000."""
    width = tree_math.node_width(self.n_leaves)
    out = [self.n_leaves.to_bytes(2, "big"), width.to_bytes(2, "big")]
    nodes = self._nodes
    for idx in range(width):
        node = nodes.get(idx)
        if node is None:
            out.append(b"\x00")
            continue
        first: object
        if idx % 2 == 0:
            first, second, third = node.leaf_node, node.public_key, node.private_key
        else:
            first, second, third = node.public_key, node.private_key, node.parent_hash
        kept = node.__dict__.get(_NODE_STATE_ATTR)
        if kept is None or kept[0] is not first or kept[1] is not second or kept[2] is not third:
            kept = (first, second, third, _node_state(idx % 2 == 0, (first, second, third)))
            node.__dict__[_NODE_STATE_ATTR] = kept
        out.append(kept[3])
    return b"".join(out)


_NODE_STATE_ATTR = "_kalandra_state"


def _node_state(is_leaf: bool, fields: tuple[Any, Any, Any]) -> bytes:
    if is_leaf:
        leaf_node, public_key, private_key = fields
        if not (leaf_node or public_key or private_key):
            return b"\x00"
        return (
            b"\x01"
            + _opaque16(leaf_node.serialize() if leaf_node else b"")
            + _opaque16(public_key or b"")
            + _opaque16(private_key or b"")
        )
    public_key, private_key, parent_hash = fields
    if not (public_key or private_key or parent_hash):
        return b"\x00"
    return (
        b"\x02"
        + _opaque16(public_key or b"")
        + _opaque16(private_key or b"")
        + _opaque16(parent_hash or b"")
    )


def _load_tree(self: RatchetTree, data: bytes) -> None:
    if not data.startswith(_UNMERGED_MAGIC):
        _library_load_tree(self, data)
        return
    at = len(_UNMERGED_MAGIC)
    size = int.from_bytes(data[at : at + 4], "big")
    block = data[at + 4 : at + 4 + size]
    unmerged: dict[int, list[int]] = {}
    count = int.from_bytes(block[:4], "big")
    pos = 4
    for _ in range(count):
        index = int.from_bytes(block[pos : pos + 4], "big")
        n = int.from_bytes(block[pos + 4 : pos + 8], "big")
        pos += 8
        unmerged[index] = [
            int.from_bytes(block[pos + 4 * i : pos + 4 * i + 4], "big") for i in range(n)
        ]
        pos += 4 * n
    _load_tree_state(self, data, at + 4 + size, unmerged)


def _load_tree_state(
    self: RatchetTree, data: bytes, off: int, unmerged: dict[int, list[int]]
) -> None:
    """The library's load_full_state from ``data[off:]``, with the unmerged leaves set before
    the tree is hashed (once: the library hashed it, and we hashed it again after restoring the
    unmerged leaves), reading at offsets instead of copying the rest of the buffer."""
    n, off = tls_codec.read_uint16(data, off)
    width, off = tls_codec.read_uint16(data, off)
    self._nodes.clear()
    self._n_leaves = n
    read_uint8, read_opaque16 = tls_codec.read_uint8, tls_codec.read_opaque16
    for idx in range(width):
        node_type, off = read_uint8(data, off)
        if node_type == 0:
            continue
        node = self.get_node(idx)
        if node.is_leaf:
            blob, off = read_opaque16(data, off)
            pk, off = read_opaque16(data, off)
            sk, off = read_opaque16(data, off)
            if blob:
                leaf = LeafNode.deserialize(blob)
                # The bytes it was saved as are its encoding (what the live group hashed).
                object.__setattr__(leaf, LEAF_ENCODING_ATTR, bytes(blob))
                node.leaf_node = leaf
                node.public_key = leaf.encryption_key
            else:
                node.public_key = pk if pk else None
            node.private_key = sk if sk else None
        else:
            pk, off = read_opaque16(data, off)
            sk, off = read_opaque16(data, off)
            ph, off = read_opaque16(data, off)
            node.public_key = pk if pk else None
            node.private_key = sk if sk else None
            node.parent_hash = ph if ph else None
    for index, leaves in unmerged.items():
        self.get_node(index).unmerged_leaves = leaves
    if self.n_leaves > 0:
        self.calculate_tree_hash()


def _correct_tree_state() -> None:
    if getattr(RatchetTree.serialize_full_state, "_kalandra_corrected", False):
        return
    _require_audited(RatchetTree.serialize_full_state, "tree state keeps unmerged leaves")
    _require_audited(RatchetTree.load_full_state, "tree state keeps unmerged leaves")
    _serialize_tree._kalandra_corrected = True  # type: ignore[attr-defined]
    RatchetTree.serialize_full_state = _serialize_tree  # type: ignore[method-assign]
    RatchetTree.load_full_state = _load_tree  # type: ignore[method-assign]


_correct_tree_state()


def join_from_welcome(
    crypto: CryptoProvider,
    welcome: Welcome,
    key_package: KeyPackage,
    init_priv: bytes,
    encryption_priv: bytes,
    *,
    psks: Mapping[bytes, bytes] | None = None,
    ratchet_tree: bytes | None = None,
) -> MLSGroup:
    """Join from a Welcome; ``ratchet_tree`` is the tree when it is not in the GroupInfo."""
    _require_audited(MLSGroup.from_welcome, "out-of-band ratchet tree join")
    known = dict(psks or {})
    # from_welcome tries to open every EncryptedGroupSecrets in turn, each HPKE open hashing the
    # whole encrypted GroupInfo: O(N^2) for a Welcome to N new members. Only the entry naming
    # our KeyPackage (RFC 9420 §12.4.3.1) can open, so hand it just that one.
    ref = make_key_package_ref(crypto, key_package.serialize())
    mine = [egs for egs in welcome.secrets if egs.new_member == ref]
    if len(mine) == 1:
        welcome = Welcome(
            welcome.version, welcome.cipher_suite, mine, welcome.encrypted_group_info
        )
    token = _WELCOME_LEAF_PARENT_HASH.set(True)
    try:
        group = MLSGroup.from_welcome(
            welcome=welcome,
            hpke_private_key=init_priv,
            crypto_provider=crypto,
            key_package=key_package,
            welcome_psk_resolver=lambda pid: _psk_value(known, pid),
            encryption_private_key=encryption_priv,
        )
    finally:
        _WELCOME_LEAF_PARENT_HASH.reset(token)
    if ratchet_tree is not None:
        if group._ratchet_tree.n_leaves != 0:
            raise ValueError("ratchet tree given twice (GroupInfo extension and out of band)")
        _install_tree(
            group, crypto, welcome, key_package, init_priv, encryption_priv, known, ratchet_tree
        )
    if group.get_own_leaf_index() < 0:
        raise ValueError("our KeyPackage's leaf is not in the group's ratchet tree")
    return group


def _install_tree(
    group: MLSGroup,
    crypto: CryptoProvider,
    welcome: Welcome,
    key_package: KeyPackage,
    init_priv: bytes,
    encryption_priv: bytes,
    psks: Mapping[bytes, bytes],
    ratchet_tree: bytes,
) -> None:
    # from_welcome saw no tree, so it skipped what RFC 9420 §12.4.3.1 requires; redo it here.
    secrets, info, _ = open_welcome(crypto, welcome, key_package, init_priv, psks)
    context = info.group_context
    tree = create_tree_backend(crypto, group._tree_backend_id)
    tree.load_full_tree_from_welcome_bytes(ratchet_tree)
    if tree.calculate_tree_hash() != context.tree_hash:
        raise ValueError("ratchet tree hash does not match GroupContext.tree_hash")
    tree.verify_parent_hash_chains()
    for leaf in range(tree.n_leaves):
        node = tree.get_node(leaf * 2).leaf_node
        if node is None:
            continue
        node.validate(
            crypto,
            group_id=context.group_id,
            leaf_index=leaf,
            group_context=context,
            expected_source=None,
        )
    validate_tree_leaf_key_uniqueness(tree)
    signer = tree.get_node(info.signer_leaf_index * 2).leaf_node
    if signer is None:
        raise ValueError("GroupInfo signer leaf is blank")
    crypto.verify_with_label(
        signer.signature_key, b"GroupInfoTBS", info.tbs_serialize(), info.signature.value
    )
    own = key_package.leaf_node
    if own is None or group._key_schedule is None:
        raise ValueError("KeyPackage without a LeafNode, or group without a key schedule")
    mine = [
        leaf
        for leaf in range(tree.n_leaves)
        if (node := tree.get_node(leaf * 2).leaf_node) is not None
        and node.signature_key == own.signature_key
        and node.encryption_key == own.encryption_key
    ]
    if len(mine) != 1:
        raise ValueError("our KeyPackage's leaf is not in the ratchet tree")
    tree.get_node(mine[0] * 2).private_key = encryption_priv
    if secrets.path_secret is not None:
        tree.apply_joiner_path_secret(
            mine[0], secrets.path_secret, committer_leaf_index=info.signer_leaf_index
        )
    group._ratchet_tree = tree
    group._own_leaf_index = mine[0]
    # The secret tree was sized for the empty tree; rebuild it for the real leaf count.
    group._secret_tree = SecretTree(
        group._key_schedule.encryption_secret,
        crypto,
        n_leaves=tree.n_leaves,
        window_size=group._secret_tree_window_size,
        max_generation_gap=group._secret_tree_max_generation_gap,
        aead_limit_bytes=group._secret_tree_aead_limit_bytes,
    )


# --- a group's state that the library keeps private ---------------------------------------------
# MLSGroup has no public accessor for its tree, GroupContext, key schedule, secret tree, crypto
# provider or proposals. The rest of the project reaches them only through these, so a library
# upgrade shows here what we rely on.


def group_tree(group: MLSGroup) -> RatchetTreeBackend:
    """The group's ratchet tree (changing it changes the group)."""
    return group._ratchet_tree


def group_context(group: MLSGroup) -> GroupContext:
    """The GroupContext of the group's current epoch."""
    context = group._group_context
    assert context is not None
    return context


def group_key_schedule(group: MLSGroup) -> KeySchedule:
    schedule = group._key_schedule
    assert schedule is not None
    return schedule


def group_secret_tree(group: MLSGroup) -> SecretTree:
    tree = group._secret_tree
    assert tree is not None
    return tree


def group_crypto(group: MLSGroup) -> CryptoProviderProtocol:
    """The crypto provider the group was made or loaded with."""
    return group._crypto_provider


def pending_proposals(group: MLSGroup) -> list[Proposal]:
    """The proposals received this epoch and not yet committed: the library's own list, so a
    proposal appended to it goes (inline) into the next commit."""
    return group._pending_proposals


def cached_proposal(group: MLSGroup, reference: bytes) -> Proposal | None:
    """The proposal a commit names by ``reference``, if this epoch received it."""
    cached = group._proposal_cache.get(reference)
    return None if cached is None else cached[0]


# --- handshake processing ----------------------------------------------------------------------


def process_handshake(group: MLSGroup, message: bytes) -> None:
    """Apply one received proposal or commit (MLSMessage bytes) to ``group``."""
    msg = MLSMessage.deserialize(message)
    if msg.wire_format != WireFormat.PUBLIC_MESSAGE:
        # rfc9420 1.3.0 demands a membership tag on every commit (defect 9): not handled yet.
        raise UnsupportedMessageError(f"wire format {int(msg.wire_format)} not supported yet")
    content: Any = msg.get_parsed_content()
    framed = content.tbs.framed_content
    plaintext = MLSPlaintext(auth_content=content)
    if framed.content_type == ContentType.PROPOSAL:
        group.process_proposal(plaintext, framed.sender, msg.wire_format)
    elif framed.content_type == ContentType.COMMIT:
        if framed.sender.sender_type == SenderType.NEW_MEMBER_COMMIT:
            group.process_external_commit(plaintext)
        else:
            group.process_commit(plaintext, framed.sender.sender)
    else:
        raise UnsupportedMessageError(f"content type {int(framed.content_type)} is not handshake")
