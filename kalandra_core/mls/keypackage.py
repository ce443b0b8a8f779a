"""KeyPackages: building ours (with the private keys a Welcome needs) and reading anyone's.

Credential = BasicCredential whose identity is the member id as u64 little-endian (the only
little-endian value of the protocol, as the reference's OpenMLS clients do). The leaf signature
key is the device's Ed25519 key, the same key that signs its frames. Lifetimes start a few
minutes in the past: OpenMLS rejects a leaf whose not_before is the current second.

A last-resort KeyPackage (RFC 9420 section 16.8) carries the ``last_resort`` extension (type
0x000A, empty data, from the MLS extensions registry) in its KeyPackage extensions: the server
keeps one per member and hands it out, without consuming it, once the others are gone; its
owner keeps its private keys after joining with it.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Final

import cbor2

from ._lib import (
    CipherSuite,
    Credential,
    CryptoProvider,
    Extension,
    KeyPackage,
    LeafNode,
    LeafNodeSource,
    MLSMessage,
    MLSVersion,
    Signature,
    WireFormat,
    build_capabilities_data,
    crypto_for_suite,
    make_key_package_ref,
)
from .errors import InvalidMlsMessage

SUITE_X25519_AES128GCM: Final = 0x0001
SUITE_X25519_CHACHA20: Final = 0x0003
SUPPORTED_SUITES: Final = (SUITE_X25519_AES128GCM, SUITE_X25519_CHACHA20)
DEFAULT_LIFETIME_SECONDS: Final = 90 * 24 * 3600
BACKDATE_SECONDS: Final = 300
LAST_RESORT_EXTENSION: Final = 0x000A
_STATE_VERSION: Final = 1


def member_identity(member_id: int) -> bytes:
    return struct.pack("<Q", member_id)


def member_id_of(identity: bytes) -> int | None:
    """Member id from a credential identity (its first 8 bytes, LE), or None if too short."""
    if len(identity) < 8:
        return None
    return int(struct.unpack_from("<Q", identity)[0])


def signature_public_key(signing_key: bytes) -> bytes:
    from nacl.signing import SigningKey

    return bytes(SigningKey(signing_key).verify_key)


@dataclass(frozen=True, slots=True)
class KeyPackageBundle:
    """A KeyPackage we published and the private keys needed to join with it. Secret."""

    member_id: int
    suite: int
    key_package: bytes  # bare TLS KeyPackage, as the reference sends it
    ref: bytes  # KeyPackageRef: how a Welcome names this package
    init_private_key: bytes
    encryption_private_key: bytes
    signing_key: bytes

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            [
                _STATE_VERSION,
                self.member_id,
                self.suite,
                self.key_package,
                self.ref,
                self.init_private_key,
                self.encryption_private_key,
                self.signing_key,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyPackageBundle:
        fields = cbor2.loads(data)
        if not isinstance(fields, list) or len(fields) != 8 or fields[0] != _STATE_VERSION:
            raise ValueError("not a key package bundle (or an unknown version)")
        return cls(*fields[1:])


def build_key_package(
    member_id: int,
    signing_key: bytes,
    *,
    suite: int = SUITE_X25519_AES128GCM,
    lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS,
    now: float | None = None,
    last_resort: bool = False,
) -> KeyPackageBundle:
    """A fresh KeyPackage for ``member_id`` signed with the device key ``signing_key``
    (flagged with the ``last_resort`` extension if asked)."""
    if suite not in SUPPORTED_SUITES:
        raise ValueError(f"unsupported cipher suite 0x{suite:04x}")
    crypto = crypto_for_suite(suite)
    cs = crypto.active_ciphersuite
    init_priv, init_pub = crypto.generate_key_pair()
    enc_priv, enc_pub = crypto.generate_key_pair()
    sig_pub = signature_public_key(signing_key)
    start = int(now if now is not None else time.time()) - BACKDATE_SECONDS
    # A KeyPackage extension must be listed in its leaf's capabilities (RFC 9420 section 10.1).
    flagged = [LAST_RESORT_EXTENSION] if last_resort else []
    capabilities = build_capabilities_data([cs.suite_id], flagged, include_grease=False)

    def leaf(signature: bytes) -> LeafNode:
        return LeafNode(
            encryption_key=enc_pub,
            signature_key=sig_pub,
            capabilities=capabilities,
            credential=Credential(member_identity(member_id), sig_pub),
            leaf_node_source=LeafNodeSource.KEY_PACKAGE,
            lifetime_not_before=start,
            lifetime_not_after=start + BACKDATE_SECONDS + lifetime_seconds,
            extensions=[],
            signature=signature,
        )

    signed_leaf = leaf(
        crypto.sign_with_label(signing_key, b"LeafNodeTBS", leaf(b"").tbs_serialize())
    )
    suite_struct = CipherSuite(cs.kem, cs.kdf, cs.aead, suite_id=cs.suite_id)

    extensions = [Extension(ext, b"") for ext in flagged]

    def package(signature: bytes) -> KeyPackage:
        return KeyPackage(
            MLSVersion.MLS10, suite_struct, init_pub, signed_leaf, extensions, Signature(signature)
        )

    kp = package(
        crypto.sign_with_label(signing_key, b"KeyPackageTBS", package(b"").tbs_serialize())
    )
    data = kp.serialize()
    return KeyPackageBundle(
        member_id=member_id,
        suite=suite,
        key_package=data,
        ref=make_key_package_ref(crypto, data),
        init_private_key=init_priv,
        encryption_private_key=enc_priv,
        signing_key=bytes(signing_key),
    )


def parse_key_package(data: bytes, crypto: CryptoProvider) -> KeyPackage:
    """Read and verify a KeyPackage sent bare (reference) or wrapped in an MLSMessage (mls-rs).

    A bare KeyPackage starts with version 0x0001 and its cipher suite; an MLSMessage with version
    0x0001 and wire format 0x0005 (key_package). Suite 0x0005 (P-521) is not one we support, so
    the two cannot be confused.
    """
    try:
        if data[:4] == b"\x00\x01\x00\x05":
            msg = MLSMessage.deserialize(data)
            if msg.wire_format != WireFormat.KEY_PACKAGE:
                raise InvalidMlsMessage("expected a KeyPackage")
            data = msg.content
        kp = KeyPackage.deserialize(data)
        kp.verify(crypto, current_time=int(time.time()))
    except InvalidMlsMessage:
        raise
    except Exception as exc:
        raise InvalidMlsMessage(f"invalid KeyPackage: {exc}") from None
    return kp


def is_last_resort(kp: KeyPackage) -> bool:
    return any(e.ext_type == LAST_RESORT_EXTENSION for e in kp.extensions or [])


def bundle_is_last_resort(bundle: KeyPackageBundle) -> bool:
    """Whether our own KeyPackage was published as the last-resort one (read, not verified)."""
    try:
        return is_last_resort(KeyPackage.deserialize(bundle.key_package))
    except Exception:
        return False


def key_package_member_id(kp: KeyPackage) -> int:
    cred = kp.leaf_node.credential if kp.leaf_node is not None else None
    member_id = member_id_of(cred.identity) if cred is not None else None
    if member_id is None:
        raise InvalidMlsMessage("KeyPackage credential is not a Kalandra member id")
    return member_id
