"""Checks for the passive-client vectors: join from a Welcome, then follow every commit."""

from __future__ import annotations

from kalandra_core.mls import _lib as mls

from ._common import Mismatch, Vector, expect, h


def check_passive_client(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    kp = mls.MLSMessage.deserialize(h(vec["key_package"])).get_parsed_content()
    if not isinstance(kp, mls.KeyPackage) or kp.leaf_node is None:
        raise Mismatch("key_package: not a KeyPackage with a LeafNode")
    init_priv, enc_priv = h(vec["init_priv"]), h(vec["encryption_priv"])
    expect("init_priv", kp.init_key, crypto.hpke_public_from_private(init_priv))
    expect(
        "encryption_priv", kp.leaf_node.encryption_key, crypto.hpke_public_from_private(enc_priv)
    )
    sig = crypto.signature_public_from_private(h(vec["signature_priv"]))
    expect("signature_priv", kp.leaf_node.signature_key, sig)

    welcome = mls.MLSMessage.deserialize(h(vec["welcome"])).get_parsed_content()
    if not isinstance(welcome, mls.Welcome):
        raise Mismatch("welcome: not a Welcome")
    psks = {h(p["psk_id"]): h(p["psk"]) for p in vec["external_psks"]}
    tree = vec.get("ratchet_tree")
    group = mls.join_from_welcome(
        crypto,
        welcome,
        kp,
        init_priv,
        enc_priv,
        psks=psks,
        ratchet_tree=h(tree) if tree is not None else None,
    )
    expect(
        "initial_epoch_authenticator",
        h(vec["initial_epoch_authenticator"]),
        group.get_epoch_authenticator(),
    )
    for n, epoch in enumerate(vec["epochs"]):
        where = f"epochs[{n}]"
        before = group.get_epoch()
        for p, proposal in enumerate(epoch["proposals"]):
            try:
                mls.process_handshake(group, h(proposal))
            except Exception as exc:
                raise Mismatch(f"{where}.proposals[{p}]: {type(exc).__name__}: {exc}") from exc
        try:
            mls.process_handshake(group, h(epoch["commit"]))
        except Exception as exc:
            raise Mismatch(f"{where}.commit: {type(exc).__name__}: {exc}") from exc
        expect(f"{where} epoch number", before + 1, group.get_epoch())
        expect(
            f"{where}.epoch_authenticator",
            h(epoch["epoch_authenticator"]),
            group.get_epoch_authenticator(),
        )
