"""Checks for message encoding and protection: messages, message-protection, welcome."""

from __future__ import annotations

from typing import Any

from kalandra_core.mls import _lib as mls

from ._common import Mismatch, Vector, expect, h

# The one suite messages.json is encoded for; only the ratchet tree parser needs a provider.
_MESSAGES_SUITE = 1


def _mls_message(field: str, data: bytes, wire_format: Any) -> Any:
    """Parse an MLSMessage of the given wire format and check it re-encodes to the same bytes."""
    msg = mls.MLSMessage.deserialize(data)
    expect(f"{field} wire_format", int(wire_format), int(msg.wire_format))
    inner = msg.get_parsed_content()
    rebuilt = mls.MLSMessage(msg.version, msg.wire_format, inner.serialize()).serialize()
    expect(f"{field} re-encode", data, rebuilt)
    return inner


def check_messages(vec: Vector) -> None:
    wf = mls.WireFormat
    expected_types: list[tuple[str, Any, type]] = [
        ("mls_welcome", wf.WELCOME, mls.Welcome),
        ("mls_group_info", wf.GROUP_INFO, mls.GroupInfo),
        ("mls_key_package", wf.KEY_PACKAGE, mls.KeyPackage),
        ("public_message_application", wf.PUBLIC_MESSAGE, mls.AuthenticatedContent),
        ("public_message_proposal", wf.PUBLIC_MESSAGE, mls.AuthenticatedContent),
        ("public_message_commit", wf.PUBLIC_MESSAGE, mls.AuthenticatedContent),
        ("private_message", wf.PRIVATE_MESSAGE, mls.MLSCiphertext),
    ]
    for field, wire_format, cls in expected_types:
        inner = _mls_message(field, h(vec[field]), wire_format)
        if not isinstance(inner, cls):
            raise Mismatch(f"{field}: parsed as {type(inner).__name__}")
    content_types = {
        "public_message_application": mls.ContentType.APPLICATION,
        "public_message_proposal": mls.ContentType.PROPOSAL,
        "public_message_commit": mls.ContentType.COMMIT,
    }
    for field, content_type in content_types.items():
        public: Any = mls.MLSMessage.deserialize(h(vec[field])).get_parsed_content()
        expect(f"{field} content_type", content_type, public.tbs.framed_content.content_type)

    data = h(vec["ratchet_tree"])
    tree = mls.RatchetTree(mls.crypto_for_suite(_MESSAGES_SUITE))
    tree.load_full_tree_from_welcome_bytes(data)
    expect("ratchet_tree re-encode", data, tree.serialize_full_tree_for_welcome())

    data = h(vec["group_secrets"])
    expect("group_secrets re-encode", data, mls.GroupSecrets.deserialize(data).serialize())
    data = h(vec["commit"])
    expect("commit re-encode", data, mls.Commit.deserialize(data).serialize())

    # messages.json holds the proposal bodies without the ProposalType tag.
    proposals: list[tuple[str, Any]] = [
        ("add_proposal", mls.AddProposal),
        ("update_proposal", mls.UpdateProposal),
        ("remove_proposal", mls.RemoveProposal),
        ("pre_shared_key_proposal", mls.PreSharedKeyProposal),
        ("re_init_proposal", mls.ReInitProposal),
        ("external_init_proposal", mls.ExternalInitProposal),
        ("group_context_extensions_proposal", mls.GroupContextExtensionsProposal),
    ]
    for field, proposal_cls in proposals:
        data = h(vec[field])
        expect(f"{field} re-encode", data, proposal_cls.deserialize(data)._serialize_content())


_CONTENT_TYPES = {
    "proposal": "PROPOSAL",
    "commit": "COMMIT",
    "application": "APPLICATION",
}
# message-protection.json: the sender is always leaf 1 of a two-leaf group.
_SENDER = 1
_N_LEAVES = 2


def check_message_protection(vec: Vector) -> None:
    suite = int(vec["cipher_suite"])
    crypto = mls.crypto_for_suite(suite)
    context = mls.GroupContext(
        group_id=h(vec["group_id"]),
        epoch=int(vec["epoch"]),
        tree_hash=h(vec["tree_hash"]),
        confirmed_transcript_hash=h(vec["confirmed_transcript_hash"]),
        extensions=b"",
        cipher_suite_id=suite,
    )
    gc = context.serialize()
    membership_key = h(vec["membership_key"])
    sig_pub, sig_priv = h(vec["signature_pub"]), h(vec["signature_priv"])
    expect("signature_pub", sig_pub, crypto.signature_public_from_private(sig_priv))
    ks = mls.key_schedule_from_secrets(
        crypto, sender_data_secret=h(vec["sender_data_secret"]), membership_key=membership_key
    )

    def secret_tree() -> Any:
        return mls.SecretTree(h(vec["encryption_secret"]), crypto, n_leaves=_N_LEAVES)

    def unprotect(kind: str, ct: Any) -> tuple[int, bytes, Any]:
        func = (
            mls.unprotect_content_application
            if kind == "application"
            else mls.unprotect_content_handshake
        )
        sender, body, auth = func(ct, ks, secret_tree(), crypto)
        return int(sender), bytes(body), auth

    for kind, type_name in _CONTENT_TYPES.items():
        content_type = getattr(mls.ContentType, type_name)
        body = h(vec[kind])

        if kind != "application":
            # PublicMessage: verify signature and membership tag, then our own must verify too.
            field = f"{kind}_pub"
            pub = _mls_message(field, h(vec[field]), mls.WireFormat.PUBLIC_MESSAGE)
            framed = pub.tbs.framed_content
            expect(f"{field} content", body, framed.content)
            expect(f"{field} sender", _SENDER, framed.sender.sender)
            plaintext = mls.MLSPlaintext(auth_content=pub)
            mls.verify_plaintext(plaintext, sig_pub, membership_key, crypto, group_context=gc)
            signed = mls.sign_authenticated_content(
                group_id=context.group_id,
                epoch=context.epoch,
                sender_leaf_index=_SENDER,
                authenticated_data=framed.authenticated_data,
                content_type=content_type,
                content=body,
                signing_private_key=sig_priv,
                crypto=crypto,
                group_context=gc,
            )
            # A commit's auth carries a confirmation tag; the vector gives no confirmation key,
            # so reuse the received tag (it is not what is being tested here).
            auth = mls.FramedContentAuthData(
                signature=signed.auth_content.auth.signature,
                confirmation_tag=pub.auth.confirmation_tag,
            )
            own = mls.attach_membership_tag(
                mls.MLSPlaintext(
                    mls.AuthenticatedContent(
                        tbs=signed.auth_content.tbs, auth=auth, membership_tag=None
                    )
                ),
                membership_key,
                crypto,
            )
            version = mls.MLSMessage.deserialize(h(vec[field])).version
            wire = mls.MLSMessage(version, mls.WireFormat.PUBLIC_MESSAGE, own.serialize())
            reparsed = _mls_message(
                f"{field} own", wire.serialize(), mls.WireFormat.PUBLIC_MESSAGE
            )
            mls.verify_plaintext(
                mls.MLSPlaintext(auth_content=reparsed),
                sig_pub,
                membership_key,
                crypto,
                group_context=gc,
            )

        # PrivateMessage: decrypt, check content and signature, then protect ourselves.
        field = f"{kind}_priv"
        ct = _mls_message(field, h(vec[field]), mls.WireFormat.PRIVATE_MESSAGE)
        sender, got, auth = unprotect(kind, ct)
        expect(f"{field} sender", _SENDER, sender)
        expect(f"{field} content", body, got)
        _verify_private_signature(crypto, context, ct, body, auth, sig_pub)

        if kind == "application":
            signature = mls.sign_application_framed_content(
                context.group_id,
                context.epoch,
                _SENDER,
                ct.authenticated_data,
                mls.write_opaque_varint(body),
                gc,
                sig_priv,
                crypto,
            )
            own_ct = mls.protect_content_application(
                context.group_id,
                context.epoch,
                _SENDER,
                ct.authenticated_data,
                body,
                signature,
                ks,
                secret_tree(),
                crypto,
                pad_to=0,
            )
        else:
            signed = mls.sign_authenticated_content(
                group_id=context.group_id,
                epoch=context.epoch,
                sender_leaf_index=_SENDER,
                authenticated_data=ct.authenticated_data,
                content_type=content_type,
                content=body,
                signing_private_key=sig_priv,
                crypto=crypto,
                group_context=gc,
                wire_format=mls.WireFormat.PRIVATE_MESSAGE,
            )
            own_ct = mls.protect_content_handshake(
                context.group_id,
                context.epoch,
                _SENDER,
                ct.authenticated_data,
                body,
                signed.auth_content.auth.signature,
                ks,
                secret_tree(),
                crypto,
                confirmation_tag=signed.auth_content.auth.confirmation_tag,
                content_type=content_type,
                pad_to=0,
            )
        sender, got, auth = unprotect(kind, own_ct)
        expect(f"{field} own protect: sender", _SENDER, sender)
        expect(f"{field} own protect: content", body, got)
        _verify_private_signature(crypto, context, own_ct, body, auth, sig_pub)


def _verify_private_signature(
    crypto: Any, context: Any, ct: Any, body: bytes, auth: Any, sig_pub: bytes
) -> None:
    # unprotect_* only decrypt; the signature over FramedContentTBS is the receiver's job.
    framed = mls.FramedContent(
        group_id=context.group_id,
        epoch=context.epoch,
        sender=mls.Sender(_SENDER, mls.SenderType.MEMBER),
        authenticated_data=ct.authenticated_data,
        content_type=ct.content_type,
        content=body,
    )
    tbs = mls.AuthenticatedContentTBS(
        wire_format=mls.WireFormat.PRIVATE_MESSAGE,
        framed_content=framed,
        group_context=context.serialize(),
    )
    content = mls.AuthenticatedContent(tbs=tbs, auth=auth, membership_tag=None)
    mls.verify_plaintext(mls.MLSPlaintext(auth_content=content), sig_pub, None, crypto)


def check_welcome(vec: Vector) -> None:
    crypto = mls.crypto_for_suite(int(vec["cipher_suite"]))
    kp = _mls_message("key_package", h(vec["key_package"]), mls.WireFormat.KEY_PACKAGE)
    welcome = _mls_message("welcome", h(vec["welcome"]), mls.WireFormat.WELCOME)
    init_priv = h(vec["init_priv"])
    expect(
        "init_priv matches key_package", kp.init_key, crypto.hpke_public_from_private(init_priv)
    )
    secrets, info, psk_secret = mls.open_welcome(crypto, welcome, kp, init_priv, {})
    crypto.verify_with_label(
        h(vec["signer_pub"]), b"GroupInfoTBS", info.tbs_serialize(), info.signature.value
    )
    ks = mls.KeySchedule.from_joiner_secret(
        secrets.joiner_secret, psk_secret, info.group_context, crypto
    )
    mls.validate_confirmation_tag(
        crypto,
        ks.confirmation_key,
        info.group_context.confirmed_transcript_hash,
        info.confirmation_tag,
    )
