"""Handshake framing helpers: PrivateMessage protect/unprotect, external committers and
external senders. Used by group.py; split out to keep the group API readable.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._lib import (
    AuthenticatedContent,
    AuthenticatedContentTBS,
    Commit,
    ContentType,
    Credential,
    FramedContent,
    KeyPackage,
    LeafNode,
    MLSCiphertext,
    MLSMessage,
    MLSPlaintext,
    ProposalOrRefType,
    RemoveProposal,
    Sender,
    SenderType,
    WireFormat,
    attach_membership_tag,
    cached_proposal,
    crypto_for_suite,
    group_context,
    group_crypto,
    group_key_schedule,
    group_secret_tree,
    group_tree,
    protect_content_handshake,
    sign_authenticated_content,
    unprotect_content_handshake,
    write_opaque_varint,
)
from ._lib import (
    MLSGroup as LibGroup,
)
from .errors import InvalidMlsMessage
from .keypackage import SUITE_X25519_AES128GCM, member_identity


def removed_leaves(lib: LibGroup, commit: Commit) -> set[int]:
    """Leaves a commit removes, whether its Removes are inline or by reference."""
    leaves: set[int] = set()
    for por in commit.proposals:
        if por.typ == ProposalOrRefType.PROPOSAL and isinstance(por.proposal, RemoveProposal):
            leaves.add(por.proposal.removed)
        elif por.typ == ProposalOrRefType.REFERENCE and por.reference is not None:
            cached = cached_proposal(lib, por.reference)
            if isinstance(cached, RemoveProposal):
                leaves.add(cached.removed)
    return leaves


def place_external_committer(
    lib: LibGroup, plaintext: MLSPlaintext, commit: Commit
) -> MLSPlaintext:
    """Defect 7: put the new_member_commit sender at the leaf it will occupy.

    The sender's leaf index is not on the wire for new_member_commit (so the signature is
    unaffected); the joiner takes the leftmost blank leaf after this commit's Removes, or a new
    leaf past the end, exactly where its own ``add_leaf`` put it.
    """
    tree = group_tree(lib)
    blank = removed_leaves(lib, commit)
    blank.update(i for i in range(tree.n_leaves) if tree.get_node(i * 2).leaf_node is None)
    index = min(blank) if blank else tree.n_leaves
    if index == tree.n_leaves:
        # Grow the tree the way the joiner's add_leaf did; the path merge replaces the leaf.
        if commit.path is None:
            raise InvalidMlsMessage("external commit without an UpdatePath")
        tree.add_leaf(KeyPackage(leaf_node=LeafNode.deserialize(commit.path.leaf_node)))
    framed = plaintext.auth_content.tbs.framed_content
    object.__setattr__(framed, "sender", Sender(index, SenderType.NEW_MEMBER_COMMIT))
    return plaintext


def protect(lib: LibGroup, plaintext: MLSPlaintext, own_leaf: int, *, already_sent: int) -> bytes:
    """Encrypt our signed handshake content as a PrivateMessage under this epoch's handshake
    keys, after skipping the ``already_sent`` generations used earlier in the epoch."""
    secret_tree = group_secret_tree(lib)
    for _ in range(already_sent):
        secret_tree.next_handshake(own_leaf)
    auth = plaintext.auth_content
    framed = auth.tbs.framed_content
    ciphertext = protect_content_handshake(
        group_id=framed.group_id,
        epoch=framed.epoch,
        sender_leaf_index=own_leaf,
        authenticated_data=framed.authenticated_data,
        content=framed.content,
        signature=auth.signature,
        key_schedule=group_key_schedule(lib),
        secret_tree=secret_tree,
        crypto=group_crypto(lib),
        confirmation_tag=auth.confirmation_tag,
        content_type=framed.content_type,
    )
    return MLSMessage.from_private_message(ciphertext).serialize()


def unprotect(lib: LibGroup, msg: MLSMessage) -> MLSPlaintext:
    """Defect 9: a PrivateMessage handshake, authenticated by AEAD and signature, gets the
    membership tag the library insists on before process_commit/process_proposal."""
    ct = msg.get_parsed_content()
    assert isinstance(ct, MLSCiphertext)
    key_schedule, crypto = group_key_schedule(lib), group_crypto(lib)
    sender, content, auth = unprotect_content_handshake(
        ct, key_schedule, group_secret_tree(lib), crypto
    )
    framed = FramedContent(
        group_id=ct.group_id,
        epoch=ct.epoch,
        sender=Sender(sender, SenderType.MEMBER),
        authenticated_data=ct.authenticated_data,
        content_type=ct.content_type,
        content=content,
    )
    tbs = AuthenticatedContentTBS(
        wire_format=WireFormat.PRIVATE_MESSAGE,
        framed_content=framed,
        group_context=group_context(lib).serialize(),
    )
    plaintext = MLSPlaintext(AuthenticatedContent(tbs=tbs, auth=auth, membership_tag=None))
    return attach_membership_tag(plaintext, key_schedule.membership_key, crypto)


def external_senders_extension(senders: Sequence[tuple[bytes, int]]) -> bytes:
    """external_senders GroupContext extension data: (Ed25519 key, member id) entries."""
    body = b"".join(
        write_opaque_varint(key) + Credential(member_identity(member_id), key).serialize()
        for key, member_id in senders
    )
    return write_opaque_varint(body)


def external_remove_proposal(
    *,
    group_id: bytes,
    epoch: int,
    sender_index: int,
    removed_leaf: int,
    signing_key: bytes,
    suite: int = SUITE_X25519_AES128GCM,
) -> bytes:
    """A Remove proposal from external sender ``sender_index`` (position in the group's
    external_senders list), as PublicMessage bytes. Needs no group secret: the server sends it
    for moderation and any member commits it."""
    plaintext = sign_authenticated_content(
        group_id=group_id,
        epoch=epoch,
        sender_leaf_index=sender_index,
        authenticated_data=b"",
        content_type=ContentType.PROPOSAL,
        content=RemoveProposal(removed_leaf).serialize(),
        signing_private_key=signing_key,
        crypto=crypto_for_suite(suite),
        group_context=None,
        wire_format=WireFormat.PUBLIC_MESSAGE,
        sender_type=SenderType.EXTERNAL,
    )
    return MLSMessage.from_public_message(plaintext.auth_content).serialize()
