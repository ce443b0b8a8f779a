"""Checks for the primitive vectors: tree math, codec, crypto, secret tree, PSKs, key schedule."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from kalandra_core.mls import _lib as mls

from ._common import Vector, expect, expect_raises, h


def check_tree_math(vec: Vector) -> None:
    n = int(vec["n_leaves"])
    tm = mls.tree_math
    expect("n_nodes", vec["n_nodes"], tm.node_width(n))
    expect("root", vec["root"], tm.root(n))
    relations: dict[str, Callable[[int], int]] = {
        "left": tm.left,
        "right": lambda x: tm.right(x, n),
        "parent": lambda x: tm.parent(x, n),
        "sibling": lambda x: tm.sibling(x, n),
    }
    for name, func in relations.items():
        values = vec[name]
        expect(f"{name} length", int(vec["n_nodes"]), len(values))
        for x, want in enumerate(values):
            if want is None:
                expect_raises(f"{name}[{x}]", partial(func, x))
            else:
                expect(f"{name}[{x}]", want, func(x))


def check_deserialization(vec: Vector) -> None:
    header = h(vec["vlbytes_header"])
    length, end = mls.read_varint(header, 0)
    expect("length", int(vec["length"]), length)
    expect("header fully consumed", len(header), end)
    # The header is the minimal encoding, so encoding the length must give it back.
    expect("vlbytes_header re-encode", header, mls.write_varint(length))


def check_crypto_basics(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))

    r = vec["ref_hash"]
    got = crypto.hash(mls.encode_ref_hash_input(r["label"].encode(), h(r["value"])))
    expect("ref_hash.out", h(r["out"]), got)

    r = vec["expand_with_label"]
    got = crypto.expand_with_label(
        h(r["secret"]), r["label"].encode(), h(r["context"]), r["length"]
    )
    expect("expand_with_label.out", h(r["out"]), got)

    r = vec["derive_secret"]
    got = crypto.derive_secret(h(r["secret"]), r["label"].encode())
    expect("derive_secret.out", h(r["out"]), got)

    # DeriveTreeSecret = ExpandWithLabel(secret, label, uint32 generation, length), RFC 9420 §9.
    r = vec["derive_tree_secret"]
    generation = int(r["generation"]).to_bytes(4, "big")
    got = crypto.expand_with_label(h(r["secret"]), r["label"].encode(), generation, r["length"])
    expect("derive_tree_secret.out", h(r["out"]), got)

    r = vec["sign_with_label"]
    pub, label, content = h(r["pub"]), r["label"].encode(), h(r["content"])
    expect("sign_with_label.pub", pub, crypto.signature_public_from_private(h(r["priv"])))
    crypto.verify_with_label(pub, label, content, h(r["signature"]))
    own = crypto.sign_with_label(h(r["priv"]), label, content)
    crypto.verify_with_label(pub, label, content, own)

    r = vec["encrypt_with_label"]
    label, context, plaintext = r["label"].encode(), h(r["context"]), h(r["plaintext"])
    priv, pub = h(r["priv"]), h(r["pub"])
    expect("encrypt_with_label.pub", pub, crypto.hpke_public_from_private(priv))
    got = mls.decrypt_with_label(
        crypto, priv, h(r["kem_output"]), label, context, b"", h(r["ciphertext"])
    )
    expect("encrypt_with_label.plaintext", plaintext, got)
    kem_output, ciphertext = mls.encrypt_with_label(crypto, pub, label, context, b"", plaintext)
    got = mls.decrypt_with_label(crypto, priv, kem_output, label, context, b"", ciphertext)
    expect("encrypt_with_label round trip", plaintext, got)


def check_secret_tree(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    sd = vec["sender_data"]
    ks = mls.key_schedule_from_secrets(
        crypto, sender_data_secret=h(sd["sender_data_secret"]), membership_key=b""
    )
    sample = h(sd["ciphertext"])[: crypto.kdf_hash_len()]
    expect("sender_data.key", h(sd["key"]), ks.sender_data_key_from_sample(sample))
    expect("sender_data.nonce", h(sd["nonce"]), ks.sender_data_nonce_from_sample(sample))

    leaves = vec["leaves"]
    tree = mls.SecretTree(h(vec["encryption_secret"]), crypto, n_leaves=len(leaves))
    for leaf, generations in enumerate(leaves):
        # A receiver moves forward through generations; the vectors list them in order.
        for entry in sorted(generations, key=lambda e: int(e["generation"])):
            gen = int(entry["generation"])
            where = f"leaves[{leaf}] generation {gen}"
            key, nonce, _ = tree.handshake_for(leaf, gen)
            expect(f"{where} handshake_key", h(entry["handshake_key"]), key)
            expect(f"{where} handshake_nonce", h(entry["handshake_nonce"]), nonce)
            key, nonce, _ = tree.application_for(leaf, gen)
            expect(f"{where} application_key", h(entry["application_key"]), key)
            expect(f"{where} application_nonce", h(entry["application_nonce"]), nonce)


def check_psk_secret(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    ids = [
        mls.PreSharedKeyID(
            psktype=mls.PSKType.EXTERNAL, psk_id=h(p["psk_id"]), psk_nonce=h(p["psk_nonce"])
        )
        for p in vec["psks"]
    ]
    values: list[bytes | None] = [h(p["psk"]) for p in vec["psks"]]
    expect("psk_secret", h(vec["psk_secret"]), mls.derive_psk_secret(crypto, ids, values))


_EPOCH_SECRETS = (
    "joiner_secret",
    "welcome_secret",
    "sender_data_secret",
    "encryption_secret",
    "exporter_secret",
    "epoch_authenticator",
    "external_secret",
    "confirmation_key",
    "membership_key",
    "resumption_psk",
    "init_secret",
)


def check_key_schedule(vec: Vector) -> None:
    suite = int(vec["cipher_suite"])
    crypto = mls.crypto_for_suite(suite)
    group_id = h(vec["group_id"])
    init_secret = h(vec["initial_init_secret"])
    for epoch, ep in enumerate(vec["epochs"]):
        where = f"epochs[{epoch}]"
        context = mls.GroupContext(
            group_id=group_id,
            epoch=epoch,
            tree_hash=h(ep["tree_hash"]),
            confirmed_transcript_hash=h(ep["confirmed_transcript_hash"]),
            extensions=b"",
            cipher_suite_id=suite,
        )
        expect(f"{where}.group_context", h(ep["group_context"]), context.serialize())
        ks = mls.KeySchedule(
            init_secret, h(ep["commit_secret"]), context, h(ep["psk_secret"]), crypto
        )
        for name in _EPOCH_SECRETS:
            expect(f"{where}.{name}", h(ep[name]), getattr(ks, name))
        _, external_pub = crypto.derive_key_pair(ks.external_secret)
        expect(f"{where}.external_pub", h(ep["external_pub"]), external_pub)
        ex = ep["exporter"]
        # The label is used as given: ASCII text (it only looks like hex), unlike the context.
        label, ctx, length = ex["label"].encode(), h(ex["context"]), int(ex["length"])
        want = h(ex["secret"])
        got = mls.mls_exporter(crypto, ks.exporter_secret, label, ctx, length)
        expect(f"{where}.exporter.secret", want, got)
        # The corrected KeySchedule.export (what MLSGroup.export_secret uses) must agree.
        expect(
            f"{where}.exporter.secret via KeySchedule.export", want, ks.export(label, ctx, length)
        )
        init_secret = ks.init_secret


def check_transcript_hashes(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    data = h(vec["authenticated_content"])
    # AuthenticatedContent = WireFormat (uint16) || FramedContent || auth; the library's parser
    # takes the wire format separately, as it comes from the MLSMessage envelope.
    wire_format = int.from_bytes(data[:2], "big")
    content = mls.AuthenticatedContent.deserialize(data[2:], wire_format=wire_format)
    expect("authenticated_content re-encode", data, content.serialize_authenticated_content())
    tag = content.confirmation_tag
    if tag is None:
        raise ValueError("authenticated_content carries no confirmation_tag")

    state = mls.TranscriptState(crypto, interim=h(vec["interim_transcript_hash_before"]))
    confirmed = state.update_with_handshake(mls.MLSPlaintext(auth_content=content))
    expect("confirmed_transcript_hash_after", h(vec["confirmed_transcript_hash_after"]), confirmed)
    expect("confirmation_tag", tag, state.compute_confirmation_tag(h(vec["confirmation_key"])))
    mls.validate_confirmation_tag(crypto, h(vec["confirmation_key"]), confirmed, tag)
    expect("confirmed after finalize", confirmed, state.finalize_confirmed(tag))
    expect("interim_transcript_hash_after", h(vec["interim_transcript_hash_after"]), state.interim)
