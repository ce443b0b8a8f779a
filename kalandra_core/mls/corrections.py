"""Send-side corrections of rfc9420 1.3.0 (defects 1-3, 5-9 of docs/mls-library.md).

Each correction first checks that the library code it replaces or relies on is byte-for-byte the
audited 1.3.0 source, and raises LibraryChangedError otherwise: an upstream change could make a
correction wrong or apply a fix twice.

* 1-3, UpdatePath (``RatchetTree.create_update_path``): the committer's new leaf gets a *fresh*
  HPKE key pair (RFC 9420 §7.5: no post-compromise security without it), is re-signed as a
  LeafNode with source=commit, the new parent_hash, group_id and leaf index (receivers reject the
  old signature), and is installed in the committer's own tree before the provisional tree hash
  is taken (otherwise path secrets are encrypted under the wrong GroupContext).
  The signing key and group id are not parameters of that method, so :func:`committing` hands
  them over in a context variable for the duration of one ``create_commit``.
* 5, stale proposals: ``process_commit`` leaves pending proposals and the proposal cache of the
  old epoch behind; :func:`finish_processed_commit` clears them (proposals never outlive an epoch).
* 6-8, external commits: the joiner's leaf index is the leaf ``add_leaf`` filled, not
  ``n_leaves - 1`` (6); receivers place the new_member_commit sender at that same leaf instead of
  leaf 0 (7); the committer re-derives the external key pair after applying its own commit so
  the GroupInfo it publishes carries the right ``external_pub`` (8). The joiner's side is
  :func:`prepare_external_commit`, the receivers' side ``framing.place_external_committer``.
* 9, PrivateMessage commits: ``process_commit`` insists on a membership tag, which a
  PrivateMessage does not carry (the AEAD authenticates it instead); after unprotecting, we
  attach the tag the sender would have computed so the library's check passes for what the
  AEAD and signature already proved.
* Sending PrivateMessage commits (missing in the library): ``create_commit`` always signs for
  PublicMessage, and the wire format is part of both the signature and the transcript hash. Inside
  :func:`private_handshake`, its signing call signs for PrivateMessage instead, so the epoch it
  derives is the one receivers of the encrypted commit derive; group.py then encrypts the signed
  content under the old epoch's handshake keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from ._lib import (
    ContentType,
    ExternalInitProposal,
    GroupContext,
    KeyPackage,
    LeafNode,
    LeafNodeSource,
    MLSGroup,
    PendingCommit,
    RatchetTree,
    UpdatePath,
    UpdatePathNode,
    WireFormat,
    _require_audited,
    encrypt_with_label,
    mls_labels,
    processing,
    tree_math,
    write_opaque_varint,
)
from .errors import InvalidMlsMessage

require_audited = _require_audited


# --- 1-3: the committer's UpdatePath ----------------------------------------------------------

_SIGNER: contextvars.ContextVar[tuple[bytes, bytes]] = contextvars.ContextVar("mls_committer")


@contextlib.contextmanager
def committing(signing_key: bytes, group_id: bytes) -> Iterator[None]:
    """Wrap ``MLSGroup.create_commit`` so the corrected UpdatePath can sign the new leaf."""
    token = _SIGNER.set((signing_key, group_id))
    try:
        yield
    finally:
        _SIGNER.reset(token)


def _create_update_path(
    self: RatchetTree,
    committer_index: int,
    new_leaf_node: LeafNode,
    group_context_bytes: bytes,
    excluded_leaf_pubkeys: set[bytes] | None = None,
) -> tuple[UpdatePath, bytes, dict[int, bytes]]:
    try:
        signing_key, group_id = _SIGNER.get()
    except LookupError:
        raise RuntimeError("create_commit must run inside corrections.committing()") from None
    crypto = self._crypto_provider
    leaf_node_index = committer_index * 2
    filtered_pairs = self._filtered_direct_path_pairs(
        leaf_node_index, excluded_leaf_pubkeys=excluded_leaf_pubkeys
    )
    filtered = {node for node, _ in filtered_pairs}
    full_direct_path = tree_math.direct_path(leaf_node_index, self.n_leaves)

    # RFC 9420 §7.4: fresh path secret at the bottom, "path" steps along the filtered path only.
    path_secret_by_node: dict[int, bytes] = {}
    path_secret = self._rand_provider.random_bytes(crypto.kdf_hash_len())
    for node_index in full_direct_path:
        node = self.get_node(node_index)
        node.unmerged_leaves = []
        if node_index in filtered:
            path_secret_by_node[node_index] = path_secret
            node.private_key, node.public_key = crypto.derive_key_pair(
                crypto.derive_secret(path_secret, b"node")
            )
            path_secret = crypto.derive_secret(path_secret, b"path")
        else:
            node.private_key = node.public_key = None
    if full_direct_path:
        self._set_filtered_path_parent_hashes(leaf_node_index, filtered_pairs)
        parent_hash = self._compute_parent_hash_for_leaf(committer_index)
        commit_secret = path_secret
    else:
        parent_hash = b""
        commit_secret = crypto.kdf_extract(b"", b"")

    # Defects 1-2: fresh leaf HPKE key, LeafNode re-signed with source=commit.
    enc_priv, enc_pub = crypto.generate_key_pair()

    def leaf(signature: bytes) -> LeafNode:
        return LeafNode(
            encryption_key=enc_pub,
            signature_key=new_leaf_node.signature_key,
            capabilities=new_leaf_node.capabilities,
            credential=new_leaf_node.credential,
            leaf_node_source=LeafNodeSource.COMMIT,
            parent_hash=parent_hash,
            extensions=new_leaf_node.extensions,
            signature=signature,
        )

    tbs = leaf(b"").tbs_serialize(group_id, committer_index)
    new_leaf = leaf(crypto.sign_with_label(signing_key, b"LeafNodeTBS", tbs))
    # Defect 3: install it in our own tree, then take the provisional tree hash.
    own = self.get_node(leaf_node_index)
    own.public_key, own.private_key, own.leaf_node = enc_pub, enc_priv, new_leaf
    self._recalculate_hashes_from(leaf_node_index)
    gc = GroupContext.deserialize(group_context_bytes)
    context = GroupContext(
        gc.group_id,
        gc.epoch,
        self.calculate_tree_hash(),
        gc.confirmed_transcript_hash,
        gc.extensions,
        cipher_suite_id=gc.cipher_suite_id,
    ).serialize()

    nodes: list[UpdatePathNode] = []
    for node_index, copath_index in filtered_pairs:
        secret = path_secret_by_node[node_index]
        encrypted: list[bytes] = []
        for recipient in self.resolve(copath_index, excluded_leaf_pubkeys=excluded_leaf_pubkeys):
            if recipient.public_key:
                kem_output, ciphertext = encrypt_with_label(
                    crypto,
                    recipient_public_key=recipient.public_key,
                    label=mls_labels.HPKE_UPDATE_PATH_NODE,
                    context=context,
                    aad=b"",
                    plaintext=secret,
                )
                encrypted.append(write_opaque_varint(kem_output) + write_opaque_varint(ciphertext))
        public_key = self.get_node(node_index).public_key
        assert public_key is not None  # set for every filtered-path node above
        nodes.append(UpdatePathNode(encryption_key=public_key, encrypted_path_secrets=encrypted))
    return UpdatePath(new_leaf.serialize(), nodes), commit_secret, path_secret_by_node


# --- PrivateMessage handshakes ------------------------------------------------------------------

_PRIVATE: contextvars.ContextVar[bool] = contextvars.ContextVar("mls_private", default=False)
_library_sign = processing.sign_authenticated_content  # type: ignore[attr-defined]


@contextlib.contextmanager
def private_handshake(enabled: bool = True) -> Iterator[None]:
    token = _PRIVATE.set(enabled)
    try:
        yield
    finally:
        _PRIVATE.reset(token)


def _sign_authenticated_content(*args: Any, **kwargs: Any) -> Any:
    if _PRIVATE.get() and kwargs.get("content_type") in (ContentType.COMMIT, ContentType.PROPOSAL):
        kwargs["wire_format"] = WireFormat.PRIVATE_MESSAGE
    return _library_sign(*args, **kwargs)


def _install() -> None:
    if getattr(RatchetTree.create_update_path, "_kalandra_corrected", False):
        return
    require_audited(RatchetTree.create_update_path, "defects 1-3 (UpdatePath leaf)")
    # The wrapper drives these; a change in any of them needs a new review of group.py.
    for func, name in (
        (MLSGroup.create_commit, "defects 1-3, 6 (commit creation)"),
        (MLSGroup.process_commit, "defects 5, 9 (commit processing)"),
        (MLSGroup.apply_own_commit, "defect 8 (external key pair)"),
        (MLSGroup.external_commit, "defect 6 (external joiner leaf index)"),
        (MLSGroup.process_external_commit, "defect 7 (external committer leaf)"),
    ):
        require_audited(func, name)
    _create_update_path._kalandra_corrected = True  # type: ignore[attr-defined]
    RatchetTree.create_update_path = _create_update_path  # type: ignore[method-assign]
    # create_commit passes every argument by keyword (audited above), so the wrapper sees them.
    processing.sign_authenticated_content = _sign_authenticated_content  # type: ignore[attr-defined]


_install()


# --- 5: stale proposals -----------------------------------------------------------------------


def finish_processed_commit(group: MLSGroup) -> None:
    """Drop the old epoch's proposals after a commit was applied (received or our own)."""
    group._pending_proposals = []
    group._proposal_cache = {}


# --- 8: external key pair after our own commit ---------------------------------------------------


def apply_own_commit(group: MLSGroup, pending: Any) -> None:
    group.apply_own_commit(pending)
    group._update_external_key_pair()
    finish_processed_commit(group)


def state_after_own_commit(group: MLSGroup, pending: PendingCommit) -> bytes:
    """Serialized state of the epoch our ``pending`` commit creates, without touching
    ``group`` (a copy applies it; the serialized state does not carry the pending state)."""
    clone = MLSGroup.from_bytes(group.to_bytes(), group._crypto_provider)
    clone._state = group._state
    apply_own_commit(clone, pending)
    return clone.to_bytes()


# --- 6: external commits -------------------------------------------------------------------------


def prepare_external_commit(
    group: MLSGroup, key_package: KeyPackage, encryption_private_key: bytes
) -> None:
    """Set up ``group`` (made from a GroupInfo) for our external commit: the ExternalInit
    proposal with an init secret for the group's ``external_pub``, and our leaf, which is where
    ``add_leaf`` put it (defect 6: not ``n_leaves - 1``), with its private key."""
    external_public_key = group._external_public_key
    if not external_public_key:
        raise InvalidMlsMessage("GroupInfo carries no external_pub")
    crypto = group._crypto_provider
    kem_output, _, init_secret = crypto.hpke_seal_and_export(
        public_key=external_public_key,
        info=b"",
        aad=b"",
        ptxt=b"",
        export_label=b"MLS 1.0 external init secret",
        export_length=crypto.kdf_hash_len(),
    )
    group._external_init_secret_for_commit = init_secret
    group._pending_proposals.append(ExternalInitProposal(kem_output))
    group._own_leaf_index = group._ratchet_tree.add_leaf(key_package)
    group._ratchet_tree.get_node(group._own_leaf_index * 2).private_key = encryption_private_key
