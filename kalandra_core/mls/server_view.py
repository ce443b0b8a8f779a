"""What a server can read from MLS messages without any group secret.

The sequencer follows membership of rooms with public handshakes: a PublicMessage commit shows
its inline Add proposals (with the joiners' credentials), its Removes (inline, or by reference to
a proposal sequenced earlier in the epoch) and the committer's new leaf; a GroupInfo shows the
whole roster in its ratchet-tree extension. A PrivateMessage shows only group, epoch and content
type. None of this authenticates the message: members verify it; the server relies on its own
frame signatures for who sent what, and uses these summaries only to keep its roster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from ._lib import (
    AddProposal,
    AuthenticatedContent,
    Commit,
    ContentType,
    ExtensionType,
    GroupInfo,
    KeyPackage,
    LeafNode,
    MLSCiphertext,
    MLSMessage,
    Proposal,
    ProposalOrRefType,
    RemoveProposal,
    SenderType,
    WireFormat,
    create_tree_backend,
    crypto_for_suite,
    deserialize_extensions,
    make_proposal_ref,
    parse_external_senders,
)
from .errors import InvalidMlsMessage
from .keypackage import SUITE_X25519_AES128GCM, member_id_of

_SENDER_TYPES: Final = {
    SenderType.MEMBER: "member",
    SenderType.EXTERNAL: "external",
    SenderType.NEW_MEMBER_PROPOSAL: "new_member_proposal",
    SenderType.NEW_MEMBER_COMMIT: "new_member_commit",
}


@dataclass(frozen=True, slots=True)
class LeafInfo:
    leaf_index: int | None
    member_id: int
    signature_key: bytes


@dataclass(frozen=True, slots=True)
class HandshakeSummary:
    content_type: str  # "commit", "proposal" or "application"
    group_id: bytes
    epoch: int
    private: bool
    sender_type: str | None = None  # public messages only
    sender_leaf: int | None = None  # member and external senders
    adds: list[LeafInfo] = field(default_factory=list)  # inline Add proposals
    removes: list[int] = field(default_factory=list)  # inline Remove proposals (leaves)
    references: list[bytes] = field(default_factory=list)  # proposals by reference
    path_leaf: LeafInfo | None = None  # the committer's new leaf (commits with a path)
    proposal_ref: bytes | None = None  # public proposals: how commits will refer to it
    proposal: str | None = None  # public proposals: "add", "remove", "update", ...
    proposal_remove: int | None = None  # a Remove proposal's leaf
    proposal_add: LeafInfo | None = None  # an Add proposal's joiner


@dataclass(frozen=True, slots=True)
class GroupInfoSummary:
    group_id: bytes
    epoch: int
    suite: int
    signer_leaf: int
    members: list[LeafInfo]
    external_sender_keys: list[bytes]


def _leaf(node: LeafNode | None, leaf_index: int | None) -> LeafInfo | None:
    if node is None or node.credential is None:
        return None
    member_id = member_id_of(node.credential.identity)
    if member_id is None:
        return None
    return LeafInfo(leaf_index, member_id, bytes(node.signature_key))


def _added(proposal: Proposal) -> LeafInfo | None:
    assert isinstance(proposal, AddProposal)
    return _leaf(KeyPackage.deserialize(proposal.key_package).leaf_node, None)


def inspect_handshake(data: bytes, suite: int = SUITE_X25519_AES128GCM) -> HandshakeSummary:
    """Summarise a Commit/Proposal/application MLSMessage. Raises InvalidMlsMessage."""
    try:
        msg = MLSMessage.deserialize(data)
        if msg.wire_format == WireFormat.PRIVATE_MESSAGE:
            ct = msg.get_parsed_content()
            assert isinstance(ct, MLSCiphertext)
            return HandshakeSummary(
                content_type=ContentType(ct.content_type).name.lower(),
                group_id=bytes(ct.group_id),
                epoch=int(ct.epoch),
                private=True,
            )
        if msg.wire_format != WireFormat.PUBLIC_MESSAGE:
            raise InvalidMlsMessage("not a handshake message")
        content = msg.get_parsed_content()
        assert isinstance(content, AuthenticatedContent)
        return _summarise_public(content, suite)
    except InvalidMlsMessage:
        raise
    except Exception as exc:
        raise InvalidMlsMessage(f"undecodable MLS message: {exc}") from None


def _summarise_public(content: AuthenticatedContent, suite: int) -> HandshakeSummary:
    framed = content.tbs.framed_content
    sender = framed.sender
    sender_type = _SENDER_TYPES.get(sender.sender_type, "unknown")
    sender_leaf = (
        sender.sender if sender.sender_type in (SenderType.MEMBER, SenderType.EXTERNAL) else None
    )
    base = {
        "group_id": bytes(framed.group_id),
        "epoch": int(framed.epoch),
        "private": False,
        "sender_type": sender_type,
        "sender_leaf": sender_leaf,
    }
    if framed.content_type == ContentType.PROPOSAL:
        proposal = Proposal.deserialize(framed.content)
        ref = make_proposal_ref(crypto_for_suite(suite), content.serialize_authenticated_content())
        return HandshakeSummary(
            content_type="proposal",
            proposal_ref=ref,
            proposal=type(proposal).__name__.removesuffix("Proposal").lower(),
            proposal_remove=proposal.removed if isinstance(proposal, RemoveProposal) else None,
            proposal_add=_added(proposal) if isinstance(proposal, AddProposal) else None,
            **base,  # type: ignore[arg-type]
        )
    if framed.content_type != ContentType.COMMIT:
        return HandshakeSummary(content_type="application", **base)  # type: ignore[arg-type]
    commit = Commit.deserialize(framed.content)
    adds: list[LeafInfo] = []
    removes: list[int] = []
    refs: list[bytes] = []
    for por in commit.proposals:
        if por.typ == ProposalOrRefType.REFERENCE and por.reference is not None:
            refs.append(bytes(por.reference))
        elif isinstance(por.proposal, AddProposal):
            leaf = _added(por.proposal)
            if leaf is not None:
                adds.append(leaf)
        elif isinstance(por.proposal, RemoveProposal):
            removes.append(por.proposal.removed)
    path_leaf = None
    if commit.path is not None:
        path_leaf = _leaf(LeafNode.deserialize(commit.path.leaf_node), sender_leaf)
    return HandshakeSummary(
        content_type="commit",
        adds=adds,
        removes=removes,
        references=refs,
        path_leaf=path_leaf,
        **base,  # type: ignore[arg-type]
    )


def inspect_group_info(data: bytes, *, verify: bool = True) -> GroupInfoSummary:
    """Roster and identity of a group from its GroupInfo (MLSMessage bytes, with the ratchet
    tree extension). With ``verify``, the GroupInfo signature by its signer leaf is checked."""
    try:
        msg = MLSMessage.deserialize(data)
        if msg.wire_format != WireFormat.GROUP_INFO:
            raise InvalidMlsMessage("not a GroupInfo")
        info = msg.get_parsed_content()
        assert isinstance(info, GroupInfo)
        gc = info.group_context
        suite = int(gc.cipher_suite_id)
        crypto = crypto_for_suite(suite)
        tree_data = None
        for ext in deserialize_extensions(info.extensions):
            if int(ext.ext_type) == int(ExtensionType.RATCHET_TREE):
                tree_data = ext.data
        if tree_data is None:
            raise InvalidMlsMessage("GroupInfo carries no ratchet tree")
        tree = create_tree_backend(crypto, "array")
        tree.load_full_tree_from_welcome_bytes(tree_data)
        if tree.calculate_tree_hash() != gc.tree_hash:
            raise InvalidMlsMessage("ratchet tree does not match the GroupContext")
        members = []
        for index in range(tree.n_leaves):
            leaf = _leaf(tree.get_node(index * 2).leaf_node, index)
            if leaf is not None:
                members.append(leaf)
        signer = tree.get_node(info.signer_leaf_index * 2).leaf_node
        if signer is None:
            raise InvalidMlsMessage("GroupInfo signer leaf is blank")
        if verify:
            crypto.verify_with_label(
                signer.signature_key, b"GroupInfoTBS", info.tbs_serialize(), info.signature.value
            )
        external = []
        for ext in deserialize_extensions(gc.extensions or b""):
            if int(ext.ext_type) == int(ExtensionType.EXTERNAL_SENDERS):
                external = [bytes(s.signature_key) for s in parse_external_senders(ext.data)]
        return GroupInfoSummary(
            group_id=bytes(gc.group_id),
            epoch=int(gc.epoch),
            suite=suite,
            signer_leaf=int(info.signer_leaf_index),
            members=members,
            external_sender_keys=external,
        )
    except InvalidMlsMessage:
        raise
    except Exception as exc:
        raise InvalidMlsMessage(f"invalid GroupInfo: {exc}") from None
