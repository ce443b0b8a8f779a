"""A test-only MLS (RFC 9420) interop oracle over AWS mls-rs.

It wraps the UniFFI binding published on PyPI as ``agentvault-mls-rs-uniffi`` (import name
``mls_rs_uniffi``; written against 0.1.1, which embeds mls-rs 0.55 and OpenSSL). Only a
``manylinux2014_x86_64`` wheel exists for Linux, so tests that use this module must skip on
other machines (see ``tests/interop/test_mlsrs_oracle_selfcheck.py``).

Every method takes and returns plain ``bytes`` of TLS-encoded ``MLSMessage`` structures, so the
same bytes can be fed to (or come from) our own MLS layer.

What the binding can and cannot do, and how this adapter works around it:

* **Cipher suite** ``MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`` (0x0001) only.
  Credentials are ``BasicCredential`` (type 1); the identity is whatever bytes are given.
* **Commits and proposals are sent as PublicMessage only** (mls-rs' default
  ``EncryptionOptions``; the binding cannot change it). Received commits may be PublicMessage or
  PrivateMessage: mls-rs processes both. Application messages are always PrivateMessage.
* **The committer must process its own commit**: ``add``/``remove``/``self_update`` do that
  before they return. Feeding the returned commit back into :meth:`MlsRsMember.process` fails.
* **No epoch, group-id or roster getter.** The adapter keeps the epoch itself, read from the
  cleartext headers: a PublicMessage/PrivateMessage commit for epoch ``e`` leads to ``e + 1``.
  A Welcome's epoch is encrypted, so right after :meth:`MlsRsMember.join` the adapter encrypts
  one empty application message (never sent anywhere) and reads group id and epoch from its
  PrivateMessage header. Side effect: generation 0 of the joiner's application ratchet in that
  epoch is used up, which receivers tolerate (out-of-order generations are allowed).
  The roster comes from parsing ``Group.export_tree()`` (the RFC 9420 ``ratchet_tree``
  encoding); see :meth:`MlsRsMember.roster`.
* **Remove needs a SigningIdentity object**, which is opaque (no bytes accessor) and can only be
  obtained from a ``Client`` or a received message. But the binding resolves it to a leaf only
  through the *credential identity* (``BasicIdentityProvider.identity`` followed by
  ``member_with_identity``, first match). So the adapter builds a throw-away ``Client`` with the
  victim's identity bytes and public signature key (taken from the exported ratchet tree) and an
  empty secret key (never used: the Client never signs) and removes its ``signing_identity()``.
  Consequently a member can be removed by leaf index or by identity, but if two leaves share one
  identity the binding cannot tell them apart; the adapter refuses that case.
* **The ratchet tree**: by default (``ratchet_tree_extension=True``) the Welcome carries the
  ``ratchet_tree`` GroupInfo extension. With ``False`` the tree must be passed out of band
  (:meth:`MlsRsMember.ratchet_tree`). :meth:`MlsRsMember.join` accepts either (``None`` means
  "take it from the Welcome's extension").
* **KeyPackages** are generated with mls-rs defaults: lifetime ``[now, now + 365 days]`` (no
  backdating), no KeyPackage or Leaf extensions, capabilities versions ``[mls10]``, cipher
  suites ``0x0001..0x0007``, extensions ``[]``, proposals ``[]``, credentials ``[basic]``.
  The KeyPackage private keys live only in the ``Client`` object in memory: the Welcome must be
  joined by the same :class:`MlsRsMember` instance that produced the KeyPackage.
* **What mls-rs demands of a foreign KeyPackage** (``add``): protocol version 1 and suite
  0x0001; a valid KeyPackage and LeafNode signature; ``init_key != encryption_key``; leaf source
  ``key_package`` with ``not_before <= now <= not_after`` (a future ``not_before`` is rejected);
  a basic credential listed in ``capabilities.credentials``; every leaf extension listed in
  ``capabilities.extensions``; **no default types listed in capabilities** (extension types
  1-5 and proposal types 1-7 must not appear: ``DefaultValueListed``); a signature key and
  encryption key not already in the tree (``DuplicateLeafData``).
* **Not exposed at all**: external commits / external joins / GroupInfo processing,
  external-sender proposals, PSKs, ReInit, group-context extensions, authenticated data,
  proposal contents (``Proposal`` is opaque), KeyPackage persistence.
* A removed member's binding ``Group`` stays usable (it would even create commits); the adapter
  marks itself removed and refuses further group operations.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

import mls_rs_uniffi as mls  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CIPHER_SUITE_ID = 0x0001
PROTOCOL_VERSION_MLS10 = 1

_SUITE = mls.CipherSuite.CURVE25519_AES128
_T = TypeVar("_T")

#: Base class of every error the binding raises (``Error.MlsError`` etc.).
MlsRsError = mls.Error


class WireFormat(enum.IntEnum):
    """RFC 9420 §6 ``WireFormat``."""

    PUBLIC_MESSAGE = 1
    PRIVATE_MESSAGE = 2
    WELCOME = 3
    GROUP_INFO = 4
    KEY_PACKAGE = 5


class OracleError(Exception):
    """Misuse of the oracle, or something the binding cannot do."""


# --------------------------------------------------------------------------- TLS reading


class _Reader:
    """Minimal RFC 9420 §2.1 (TLS presentation language) reader."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError("truncated MLS structure")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def varint(self) -> int:
        """RFC 9420 §2.1.2 variable-size length (1, 2 or 4 bytes; minimal encoding)."""
        first = self._data[self._pos] if self._pos < len(self._data) else None
        if first is None:
            raise ValueError("truncated MLS structure")
        prefix = first >> 6
        if prefix == 3:
            raise ValueError("invalid varint prefix 0b11")
        size = 1 << prefix
        value = int.from_bytes(self._take(size), "big") & ((1 << (8 * size - 2)) - 1)
        if prefix and value < (1 << (8 * (size // 2) - 2)):
            raise ValueError("non-minimal varint")
        return value

    def opaque(self) -> bytes:
        return self._take(self.varint())

    def at_end(self) -> bool:
        return self._pos == len(self._data)


@dataclass(frozen=True)
class MessageHeader:
    """The cleartext part of an MLSMessage.

    ``group_id``/``epoch`` are set for PublicMessage and PrivateMessage; ``sender_leaf`` only for
    a PublicMessage sent by a member (the PrivateMessage sender is encrypted).
    ``content_type`` is 1 application, 2 proposal, 3 commit (PublicMessage/PrivateMessage only).
    """

    wire_format: WireFormat
    group_id: bytes | None = None
    epoch: int | None = None
    sender_leaf: int | None = None
    content_type: int | None = None


def parse_message_header(data: bytes) -> MessageHeader:
    """Read the MLSMessage header (RFC 9420 §6, §6.2, §6.3) without any keys."""
    r = _Reader(data)
    version = r.u16()
    if version != PROTOCOL_VERSION_MLS10:
        raise ValueError(f"unsupported MLS version {version}")
    wire_format = WireFormat(r.u16())
    if wire_format == WireFormat.PUBLIC_MESSAGE:
        group_id = r.opaque()
        epoch = r.u64()
        sender_type = r.u8()
        sender_leaf = r.u32() if sender_type == 1 else None  # 1 = member
        if sender_type == 2:  # external: sender_index
            r.u32()
        r.opaque()  # authenticated_data
        content_type = r.u8()
        return MessageHeader(wire_format, group_id, epoch, sender_leaf, content_type)
    if wire_format == WireFormat.PRIVATE_MESSAGE:
        group_id = r.opaque()
        epoch = r.u64()
        content_type = r.u8()
        return MessageHeader(wire_format, group_id, epoch, None, content_type)
    return MessageHeader(wire_format)


# --------------------------------------------------------------------------- ratchet tree


@dataclass(frozen=True)
class RosterEntry:
    """One occupied leaf of the ratchet tree."""

    leaf_index: int
    credential_type: int
    identity: bytes  # BasicCredential identity (empty for other credential types)
    signature_key: bytes
    encryption_key: bytes


def _skip_capabilities(r: _Reader) -> None:
    for _ in range(5):  # versions, cipher_suites, extensions, proposals, credentials
        r.opaque()


def _read_leaf_node(r: _Reader, leaf_index: int) -> RosterEntry:
    encryption_key = r.opaque()
    signature_key = r.opaque()
    credential_type = r.u16()
    identity = b""
    if credential_type == 1:  # basic
        identity = r.opaque()
    elif credential_type == 2:  # x509: certificates<V> of Certificate{cert_data<V>}
        r.opaque()
    else:
        raise ValueError(f"cannot parse credential type {credential_type}")
    _skip_capabilities(r)
    source = r.u8()
    if source == 1:  # key_package: Lifetime
        r.u64()
        r.u64()
    elif source == 3:  # commit: parent_hash
        r.opaque()
    elif source != 2:  # 2 = update (no body)
        raise ValueError(f"bad leaf_node_source {source}")
    r.opaque()  # extensions
    r.opaque()  # signature
    return RosterEntry(leaf_index, credential_type, identity, signature_key, encryption_key)


def parse_ratchet_tree(tree: bytes) -> list[RosterEntry]:
    """Occupied leaves of an RFC 9420 §12.4.3.3 ``ratchet_tree`` (``optional<Node><V>``)."""
    outer = _Reader(tree)
    r = _Reader(outer.opaque())
    if not outer.at_end():
        raise ValueError("trailing bytes after ratchet tree")
    entries: list[RosterEntry] = []
    node_index = 0
    while not r.at_end():
        present = r.u8()
        if present == 1:
            node_type = r.u8()
            if node_type == 1:
                if node_index % 2:
                    raise ValueError("leaf node at a parent position")
                entries.append(_read_leaf_node(r, node_index // 2))
            elif node_type == 2:
                r.opaque()  # encryption_key
                r.opaque()  # parent_hash
                r.opaque()  # unmerged_leaves
            else:
                raise ValueError(f"bad node type {node_type}")
        elif present != 0:
            raise ValueError("bad optional<Node> flag")
        node_index += 1
    return entries


# --------------------------------------------------------------------------- the adapter


class Outcome(enum.Enum):
    """What :meth:`MlsRsMember.process` observed."""

    NEW_EPOCH = "new_epoch"  # a commit was applied; the member is still in the group
    REMOVED = "removed"  # a commit was applied that removed this member
    APPLICATION = "application"  # an application message was decrypted
    PROPOSAL = "proposal"  # a proposal was cached for the next commit
    OTHER = "other"  # Welcome / GroupInfo / KeyPackage (validated only)


@dataclass(frozen=True)
class Processed:
    """The result of processing one incoming MLSMessage."""

    outcome: Outcome
    epoch: int  # this member's epoch after processing
    wire_format: WireFormat
    sender_leaf: int | None = None  # committer / sender, when known
    sender_identity: bytes | None = None
    data: bytes | None = None  # application data (APPLICATION only)


def ed25519_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(32-byte seed, 32-byte public key) for an Ed25519 private key given as its seed."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 private key seed is 32 bytes")
    public = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return seed, public


def member_identity(member_id: int) -> bytes:
    """Kalandra's BasicCredential identity: the member id as u64 little-endian."""
    return member_id.to_bytes(8, "little")


def _keypair(public_key: bytes, secret_key: bytes) -> mls.SignatureKeypair:
    return mls.SignatureKeypair(
        cipher_suite=_SUITE,
        public_key=mls.SignaturePublicKey(bytes=public_key),
        secret_key=mls.SignatureSecretKey(bytes=secret_key),
    )


def _known(value: _T | None) -> _T:
    if value is None:
        raise OracleError("a header field that must be present is missing")
    return value


def _message(data: bytes) -> mls.Message:
    return mls.Message.from_bytes(data)


class MlsRsMember:
    """One mls-rs client with at most one group, driven by wire bytes.

    ``identity`` is the BasicCredential identity (Kalandra: :func:`member_identity`).
    ``signature_seed`` is the 32-byte Ed25519 private key; random if omitted.
    ``ratchet_tree_extension`` controls whether Welcomes this member creates carry the
    ``ratchet_tree`` extension (otherwise joiners need :meth:`ratchet_tree` out of band).
    """

    def __init__(
        self,
        identity: bytes,
        signature_seed: bytes | None = None,
        *,
        ratchet_tree_extension: bool = True,
    ) -> None:
        if signature_seed is None:
            generated = mls.generate_signature_keypair(_SUITE)
            public_key = generated.public_key.bytes
            secret_key = generated.secret_key.bytes
        else:
            seed, public_key = ed25519_keypair(signature_seed)
            secret_key = seed + public_key  # mls-rs' own format: seed || public key
        self.identity = identity
        self.signature_public_key = public_key
        self._client = mls.Client(
            identity,
            _keypair(public_key, secret_key),
            mls.ClientConfig(
                group_state_storage=mls.client_config_default().group_state_storage,
                use_ratchet_tree_extension=ratchet_tree_extension,
            ),
        )
        self._group: mls.Group | None = None
        self._group_id: bytes | None = None
        self._epoch = 0
        self.removed = False

    # ------------------------------------------------------------------ state

    @property
    def group_id(self) -> bytes:
        self._require_group()
        return _known(self._group_id)

    @property
    def epoch(self) -> int:
        """The current epoch, tracked by the adapter (the binding has no getter)."""
        self._require_group()
        return self._epoch

    @property
    def in_group(self) -> bool:
        return self._group is not None and not self.removed

    def _require_group(self) -> mls.Group:
        if self._group is None:
            raise OracleError("this member has no group yet")
        if self.removed:
            raise OracleError("this member was removed from the group")
        return self._group

    # ------------------------------------------------------------------ setup

    def key_package(self) -> bytes:
        """A fresh KeyPackage as MLSMessage bytes; its private keys stay in this object only."""
        data: bytes = self._client.generate_key_package_message().to_bytes()
        return data

    def create_group(self, group_id: bytes) -> None:
        """Create a one-member group at epoch 0."""
        if self._group is not None:
            raise OracleError("this member already has a group")
        self._group = self._client.create_group(group_id)
        self._group_id = group_id
        self._epoch = 0

    def join(self, welcome: bytes, ratchet_tree: bytes | None = None) -> None:
        """Join from a Welcome (MLSMessage bytes) addressed to one of our KeyPackages.

        ``ratchet_tree`` is the TLS ``optional<Node><V>`` tree, or ``None`` if the Welcome's
        GroupInfo carries the ``ratchet_tree`` extension.
        """
        if self._group is not None:
            raise OracleError("this member already has a group")
        tree = None if ratchet_tree is None else mls.RatchetTree(bytes=ratchet_tree)
        info = self._client.join_group(tree, _message(welcome))
        self._group = info.group
        # The epoch and group id are inside the encrypted GroupInfo: read them from the header
        # of a throw-away PrivateMessage (see the module docstring).
        probe = parse_message_header(self._group.encrypt_application_message(b"").to_bytes())
        self._group_id = _known(probe.group_id)
        self._epoch = _known(probe.epoch)

    # ------------------------------------------------------------------ roster

    def ratchet_tree(self) -> bytes:
        """The current ratchet tree in the RFC 9420 ``ratchet_tree`` extension encoding."""
        tree: bytes = self._require_group().export_tree().bytes
        return tree

    def roster(self) -> dict[int, RosterEntry]:
        """Occupied leaves by leaf index, parsed from :meth:`ratchet_tree`."""
        return {e.leaf_index: e for e in parse_ratchet_tree(self.ratchet_tree())}

    def leaf_index_of(self, identity: bytes) -> int:
        matches = [e.leaf_index for e in self.roster().values() if e.identity == identity]
        if len(matches) != 1:
            raise OracleError(f"identity {identity.hex()} is at leaves {matches}, not at one leaf")
        return matches[0]

    @property
    def own_leaf_index(self) -> int:
        return self.leaf_index_of(self.identity)

    # ------------------------------------------------------------------ commits

    def _apply_own(self, output: mls.CommitOutput) -> bytes:
        group = self._require_group()
        commit: bytes = output.commit_message.to_bytes()
        header = parse_message_header(commit)
        received = group.process_incoming_message(output.commit_message)
        if not received.is_commit():
            raise OracleError(f"own commit gave {received}")
        self._epoch = _known(header.epoch) + 1
        return commit

    def add(self, *key_packages: bytes) -> tuple[bytes, bytes]:
        """Commit Adds (inline proposals) and apply it; returns (commit, welcome).

        One Welcome covers all the added members. The commit is a PublicMessage.
        """
        group = self._require_group()
        output = group.add_members([_message(kp) for kp in key_packages])
        if output.welcome_message is None:
            raise OracleError("mls-rs produced no Welcome")
        welcome: bytes = output.welcome_message.to_bytes()
        return self._apply_own(output), welcome

    def remove(self, leaf_index: int) -> bytes:
        """Commit the removal of the member at ``leaf_index`` and apply it; returns the commit.

        The binding only takes an opaque ``SigningIdentity`` and resolves it by credential
        identity, so the identity at that leaf must be unique in the group.
        """
        entry = self.roster().get(leaf_index)
        if entry is None:
            raise OracleError(f"leaf {leaf_index} is blank")
        if self.leaf_index_of(entry.identity) != leaf_index:  # raises if not unique
            raise OracleError("identity resolves to another leaf")
        return self.remove_identity(entry.identity)

    def remove_identity(self, identity: bytes) -> bytes:
        """Commit the removal of the (unique) member with this credential identity."""
        group = self._require_group()
        entry = self.roster()[self.leaf_index_of(identity)]
        victim = self._signing_identity(entry)
        return self._apply_own(group.remove_members([victim]))

    def self_update(self) -> bytes:
        """An empty commit with an UpdatePath (fresh leaf key; PCS); returns the commit."""
        return self._apply_own(self._require_group().commit())

    @staticmethod
    def _signing_identity(entry: RosterEntry) -> mls.SigningIdentity:
        """A SigningIdentity equal (Rust ``Eq``) to the one at ``entry``'s leaf.

        Made by a throw-away Client with the member's credential and public key and an empty
        secret key; the Client never signs anything.
        """
        if entry.credential_type != 1:
            raise OracleError("only basic credentials can be rebuilt")
        ghost = mls.Client(
            entry.identity,
            _keypair(entry.signature_key, b""),
            mls.client_config_default(),
        )
        return ghost.signing_identity()

    def _leaf_of(
        self, identity: mls.SigningIdentity, roster: dict[int, RosterEntry]
    ) -> RosterEntry | None:
        for entry in roster.values():
            if entry.credential_type == 1 and self._signing_identity(entry) == identity:
                return entry
        return None

    # ------------------------------------------------------------------ receiving

    def process(self, message: bytes) -> Processed:
        """Process a commit, proposal or application message from another member."""
        group = self._require_group()
        header = parse_message_header(message)
        roster_before = self.roster()
        received = group.process_incoming_message(_message(message))
        if isinstance(received, mls.ReceivedMessage.COMMIT):
            self._epoch = _known(header.epoch) + 1
            sender = self._leaf_of(received.committer, roster_before)
            if received.effect.is_removed():
                self.removed = True
                outcome = Outcome.REMOVED
            elif received.effect.is_new_epoch():
                outcome = Outcome.NEW_EPOCH
            else:
                raise OracleError(f"unsupported commit effect {received.effect}")
            return self._result(outcome, header, sender)
        if isinstance(received, mls.ReceivedMessage.APPLICATION_MESSAGE):
            sender = self._leaf_of(received.sender, roster_before)
            return self._result(Outcome.APPLICATION, header, sender, bytes(received.data))
        if isinstance(received, mls.ReceivedMessage.RECEIVED_PROPOSAL):
            sender = self._leaf_of(received.sender, roster_before)
            return self._result(Outcome.PROPOSAL, header, sender)
        return self._result(Outcome.OTHER, header, None)

    def _result(
        self,
        outcome: Outcome,
        header: MessageHeader,
        sender: RosterEntry | None,
        data: bytes | None = None,
    ) -> Processed:
        return Processed(
            outcome=outcome,
            epoch=self._epoch,
            wire_format=header.wire_format,
            sender_leaf=None if sender is None else sender.leaf_index,
            sender_identity=None if sender is None else sender.identity,
            data=data,
        )

    # ------------------------------------------------------------------ secrets & messages

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        """RFC 9420 §8.5 ``MLS-Exporter(label, context, length)`` of the current epoch."""
        secret: bytes = self._require_group().export_secret(label, context, length)
        return secret

    def encrypt(self, plaintext: bytes) -> bytes:
        """An application PrivateMessage (MLSMessage bytes)."""
        data: bytes = self._require_group().encrypt_application_message(plaintext).to_bytes()
        return data
