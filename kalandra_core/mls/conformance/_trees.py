"""Checks for the ratchet tree vectors: tree-operations, tree-validation, treekem."""

from __future__ import annotations

from typing import Any

from kalandra_core.mls import _lib as mls

from ._common import Mismatch, Vector, expect, h


def _load_tree(crypto: Any, data: bytes, field: str) -> Any:
    tree = mls.RatchetTree(crypto)
    tree.load_full_tree_from_welcome_bytes(data)
    expect(f"{field} re-encode", data, tree.serialize_full_tree_for_welcome())
    return tree


def check_tree_operations(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    tree = _load_tree(crypto, h(vec["tree_before"]), "tree_before")
    expect("tree_hash_before", h(vec["tree_hash_before"]), tree.calculate_tree_hash())

    data = h(vec["proposal"])
    proposal = mls.Proposal.deserialize(data)
    expect("proposal re-encode", data, proposal.serialize())
    if isinstance(proposal, mls.AddProposal):
        tree.add_leaf(mls.KeyPackage.deserialize(proposal.key_package))
    elif isinstance(proposal, mls.UpdateProposal):
        tree.update_leaf(int(vec["proposal_sender"]), mls.LeafNode.deserialize(proposal.leaf_node))
    elif isinstance(proposal, mls.RemoveProposal):
        tree.remove_leaf(int(proposal.removed))
    else:
        raise Mismatch(f"proposal: unexpected type {type(proposal).__name__}")

    expect("tree_after", h(vec["tree_after"]), tree.serialize_full_tree_for_welcome())
    expect("tree_hash_after", h(vec["tree_hash_after"]), tree.calculate_tree_hash())


def check_tree_validation(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    tree = _load_tree(crypto, h(vec["tree"]), "tree")
    width = tree.node_width()
    expect("resolutions length", len(vec["resolutions"]), width)
    expect("tree_hashes length", len(vec["tree_hashes"]), width)
    for i, want in enumerate(vec["resolutions"]):
        expect(f"resolutions[{i}]", want, tree.resolve_indices(i))
    # Tree hashes of every node, not only the root: compute them all bottom-up.
    tree.calculate_tree_hash()
    for i, want in enumerate(vec["tree_hashes"]):
        expect(f"tree_hashes[{i}]", h(want), tree.get_node(i).hash)
    tree.verify_parent_hash_chains()
    group_id = h(vec["group_id"])
    for leaf in range(tree.n_leaves):
        node = tree.get_node(leaf * 2).leaf_node
        if node is None:
            continue
        node.validate(
            crypto, group_id=group_id, leaf_index=leaf, group_context=None, expected_source=None
        )


def _node_private(crypto: Any, path_secret: bytes) -> tuple[bytes, bytes]:
    priv, pub = crypto.derive_key_pair(crypto.derive_secret(path_secret, b"node"))
    return bytes(priv), bytes(pub)


def check_treekem(vec: Vector) -> None:
    suite = int(vec["cipher_suite"])
    crypto = mls.crypto_for_suite(suite)
    tree_bytes = h(vec["ratchet_tree"])
    tree = _load_tree(crypto, tree_bytes, "ratchet_tree")
    n_leaves = tree.n_leaves

    # The private state of each member must match the public tree.
    for member in vec["leaves_private"]:
        leaf = int(member["index"])
        where = f"leaves_private[{leaf}]"
        leaf_node = tree.get_node(leaf * 2).leaf_node
        if leaf_node is None:
            raise Mismatch(f"{where}: leaf is blank")
        enc = crypto.hpke_public_from_private(h(member["encryption_priv"]))
        expect(f"{where}.encryption_priv", leaf_node.encryption_key, enc)
        sig = crypto.signature_public_from_private(h(member["signature_priv"]))
        expect(f"{where}.signature_priv", leaf_node.signature_key, sig)
        for ps in member["path_secrets"]:
            node = int(ps["node"])
            _, pub = _node_private(crypto, h(ps["path_secret"]))
            expect(f"{where} path_secret node {node}", tree.get_node(node).public_key, pub)

    for u, entry in enumerate(vec["update_paths"]):
        where = f"update_paths[{u}]"
        sender = int(entry["sender"])
        data = h(entry["update_path"])
        update_path = mls.UpdatePath.deserialize(data)
        expect(f"{where}.update_path re-encode", data, update_path.serialize())
        want_hash = h(entry["tree_hash_after"])

        public = _load_tree(crypto, tree_bytes, "ratchet_tree")
        public.merge_update_path_public_only(update_path, sender)
        expect(f"{where}.tree_hash_after", want_hash, public.calculate_tree_hash())
        public.verify_parent_hash_chains()
        leaf_node = public.get_node(sender * 2).leaf_node
        expect(
            f"{where} sender leaf parent_hash",
            leaf_node.parent_hash,
            public._compute_parent_hash_for_leaf(sender),
        )

        # Every other member decrypts its path secret and reaches the same commit secret.
        context = mls.GroupContext(
            group_id=h(vec["group_id"]),
            epoch=int(vec["epoch"]),
            tree_hash=want_hash,
            confirmed_transcript_hash=h(vec["confirmed_transcript_hash"]),
            extensions=b"",
            cipher_suite_id=suite,
        ).serialize()
        sender_path = tree.filtered_direct_path(sender * 2)
        expect(f"{where}.path_secrets length", n_leaves, len(entry["path_secrets"]))
        for member in vec["leaves_private"]:
            leaf = int(member["index"])
            # path_secrets is indexed by leaf index (blank leaves have null), not by member.
            want_secret = entry["path_secrets"][leaf]
            if leaf == sender:
                if want_secret is not None:
                    raise Mismatch(f"{where}.path_secrets[{leaf}]: sender has a path secret")
                continue
            mine = _member_tree(crypto, tree_bytes, member)
            commit_secret = mine.merge_update_path(update_path, sender, context)
            expect(
                f"{where}.commit_secret (leaf {leaf})", h(entry["commit_secret"]), commit_secret
            )
            expect(f"{where} tree hash (leaf {leaf})", want_hash, mine.calculate_tree_hash())
            # The first node of the sender's filtered path above us holds the decrypted secret.
            ancestors = set(mls.tree_math.direct_path(leaf * 2, n_leaves))
            lca = next(node for node in sender_path if node in ancestors)
            priv, _ = _node_private(crypto, h(want_secret))
            expect(f"{where}.path_secrets[{leaf}]", priv, mine.get_node(lca).private_key)


def _member_tree(crypto: Any, tree_bytes: bytes, member: Vector) -> Any:
    """The public tree plus one member's private keys (its leaf and path nodes)."""
    tree = mls.RatchetTree(crypto)
    tree.load_full_tree_from_welcome_bytes(tree_bytes)
    tree.get_node(int(member["index"]) * 2).private_key = h(member["encryption_priv"])
    for ps in member["path_secrets"]:
        priv, _ = _node_private(crypto, h(ps["path_secret"]))
        tree.get_node(int(ps["node"])).private_key = priv
    return tree
