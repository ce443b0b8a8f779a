"""Typed payloads of every opcode that has one, in the reference's field order.

Field order is wire order (see :mod:`.schema`). MLS handshake opcodes (KeyPackage, Proposal,
Commit, Welcome) carry raw TLS-encoded MLS messages in practice; the reference also defines CBOR
wrappers for them, which we decode when the payload is a CBOR map. A raw MLS message always starts
with its u16 version 0x0001, so its first byte (0x00) can never be mistaken for a CBOR map
(0xa0..0xbf).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from .envelope_scan import usual_envelope
from .errors import PayloadDecodeError, PayloadEncodeError, UnsupportedOpcode
from .opcodes import Opcode
from .schema import (
    Bool,
    Bytes,
    CborStruct,
    ListOf,
    Nested,
    Text,
    UInt,
    UnitEnum,
    load_cbor,
    wire,
)

PROTOCOL_VERSION: Final = 1
DEFAULT_SYNC_LIMIT: Final = 100


class ErrorCode(enum.IntEnum):
    """ErrorPayload codes: the reference's 0x0001..0x0006 plus non-colliding documented ones."""

    FRAME_REJECTED = 0x0001
    LEGACY_ROOM_NOT_FOUND = 0x0002
    STORAGE_ERROR = 0x0003
    INVALID_PAYLOAD = 0x0004
    MLS_ERROR = 0x0005
    SEQUENCER_ERROR = 0x0006
    INVALID_EPOCH = 0x0101
    INVALID_COMMIT = 0x0104
    STALE_EPOCH = 0x0105
    FUTURE_EPOCH = 0x0106
    NOT_AUTHORIZED = 0x0201
    BANNED = 0x0202
    RATE_LIMITED = 0x0203
    QUOTA_EXCEEDED = 0x0204
    INVALID_SIGNATURE = 0x0205
    ROOM_NOT_FOUND = 0x0301
    MEMBER_NOT_FOUND = 0x0302
    MESSAGE_NOT_FOUND = 0x0303
    ALREADY_EXISTS = 0x0304


class ProposalType(enum.Enum):
    ADD = "Add"
    REMOVE = "Remove"
    UPDATE = "Update"
    PSK = "PSK"
    REINIT = "ReInit"
    EXTERNAL_INIT = "ExternalInit"
    GROUP_CONTEXT_EXTENSIONS = "GroupContextExtensions"


class ReceiptKind(enum.Enum):
    DELIVERED = "Delivered"
    READ = "Read"


class Payload:
    """Anything that can be a frame payload: ``encode()`` gives the payload bytes."""

    __slots__ = ()

    def encode(self) -> bytes:
        raise NotImplementedError

    def to_json(self) -> Any:
        raise NotImplementedError


class StructPayload(CborStruct, Payload):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """Ping and Pong: no payload (bytes present on the wire are ignored, as the reference does)."""

    def encode(self) -> bytes:
        return b""

    def to_json(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class RawPayload(Payload):
    """Opaque payload bytes: a raw TLS-encoded MLS message, or an opcode without a schema."""

    data: bytes

    def encode(self) -> bytes:
        return self.data

    def to_json(self) -> str:
        return self.data.hex()


# --- session -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(StructPayload):
    """``signature_key`` (ours, ignored by the reference): the device's Ed25519 key, bound to
    the account the first time its token is used; every frame it sends is signed with it.
    ``proof`` (ours): that key's signature over the token and the header's HLC timestamp
    (:mod:`.hello_proof`), required at every Hello. ``auth_token`` is a device token or a
    single-use login code."""

    version: int = wire(UInt(8), default=PROTOCOL_VERSION)
    capabilities: list[str] = wire(ListOf(Text()), default_factory=list)
    auth_token: bytes | None = wire(Bytes(), optional=True)
    signature_key: bytes | None = wire(Bytes(32), optional=True)
    proof: bytes | None = wire(Bytes(64), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply(StructPayload):
    """``member_id``, ``server_key``, ``device_token`` and ``bridge_*`` are ours: who the token
    authenticated, the server's Ed25519 key (the external sender of its moderation Remove
    proposals), after a Hello with a login code the device token the client uses from then on,
    and, on a server that embeds a Matrix bridge, the bridge's bot: its member id and its
    Matrix user id (``kalandra invite ROOM bridge``)."""

    session_id: int = wire(UInt(64))
    capabilities: list[str] = wire(ListOf(Text()), default_factory=list)
    challenge: bytes | None = wire(Bytes(), optional=True)
    member_id: int | None = wire(UInt(64), optional=True)
    server_key: bytes | None = wire(Bytes(32), optional=True)
    device_token: str | None = wire(Text(), optional=True)  # when a login code was redeemed
    bridge_member_id: int | None = wire(UInt(64), optional=True)
    bridge_mxid: str | None = wire(Text(), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(StructPayload):
    reason: str = wire(Text())


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest(StructPayload):
    """By log index (reference); with ``from_epoch``/``to_epoch`` (ours) only the commits that
    moved the room from ``from_epoch`` to ``to_epoch`` are returned."""

    from_log_index: int = wire(UInt(64))
    limit: int = wire(UInt(64), absent=DEFAULT_SYNC_LIMIT, default=DEFAULT_SYNC_LIMIT)
    from_epoch: int | None = wire(UInt(64), optional=True)
    to_epoch: int | None = wire(UInt(64), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncResponse(StructPayload):
    """``frames`` holds complete encoded frames (header + payload)."""

    frames: list[bytes] = wire(ListOf(Bytes()))
    has_more: bool = wire(Bool())
    server_epoch: int = wire(UInt(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorPayload(StructPayload):
    """Error reply. ``current_epoch``/``log_index`` are our additions (ignored by the reference):
    for StaleEpoch, the room's epoch now and the log index of the commit that moved it."""

    code: int = wire(UInt(16))
    message: str = wire(Text())
    retry_after: int | None = wire(UInt(64), optional=True)
    current_epoch: int | None = wire(UInt(64), optional=True)
    log_index: int | None = wire(UInt(64), optional=True)

    @property
    def error_code(self) -> ErrorCode | None:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


# --- MLS wrappers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPackageData(StructPayload):
    key_package_bytes: bytes = wire(Bytes())


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposalData(StructPayload):
    proposal_bytes: bytes = wire(Bytes())
    proposal_type: ProposalType = wire(UnitEnum(ProposalType))


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitData(StructPayload):
    commit_bytes: bytes = wire(Bytes())
    new_epoch: int = wire(UInt(64))
    tree_hash: bytes = wire(Bytes(32))
    is_external: bool = wire(Bool())


class Handshake(enum.Enum):
    """How a room's members send commits and proposals (GroupInfoData.handshake); receiving
    accepts both."""

    PUBLIC = "public"  # PublicMessage: the server can follow membership (default)
    PRIVATE = "private"  # PrivateMessage: needed by OpenMLS PURE_CIPHERTEXT clients


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupInfoData(StructPayload):
    """Ours (the reference defines the GroupInfo opcode without a payload): a GroupInfo
    (MLSMessage bytes) that creates a room when the room id is new, with its settings."""

    group_info: bytes = wire(Bytes())
    handshake: str | None = wire(Text(), optional=True)  # "public" (default) or "private"
    name: str | None = wire(Text(), optional=True)
    topic: str | None = wire(Text(), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class WelcomeData(StructPayload):
    welcome_bytes: bytes = wire(Bytes())
    epoch: int = wire(UInt(64))


# --- application ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PushKey(CborStruct):
    """A message key sealed to one recipient device's notification key (80-byte PCEK blob)."""

    recipient_id: int = wire(UInt(64))
    encrypted_key: bytes = wire(Bytes())


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedMessage(StructPayload):
    """Sender-key envelope of an AppMessage; ``ciphertext`` includes the 16-byte tag."""

    epoch: int = wire(UInt(64))
    sender_index: int = wire(UInt(32))
    generation: int = wire(UInt(32))
    nonce: bytes = wire(Bytes(24))
    ciphertext: bytes = wire(Bytes())
    push_keys: list[PushKey] | None = wire(ListOf(Nested(PushKey)), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt(StructPayload):
    message_log_index: int = wire(UInt(64))
    kind: ReceiptKind = wire(UnitEnum(ReceiptKind))
    timestamp: int = wire(UInt(64))  # Unix milliseconds, UTC


@dataclass(frozen=True, slots=True, kw_only=True)
class Reaction(StructPayload):
    message_log_index: int = wire(UInt(64))
    content: str = wire(Text())
    add: bool = wire(Bool())


# --- moderation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Redact(StructPayload):
    message_log_index: int = wire(UInt(64))
    reason: str = wire(Text())
    moderator_id: int = wire(UInt(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ban(StructPayload):
    user_id: int = wire(UInt(64))
    reason: str = wire(Text())
    duration_secs: int | None = wire(UInt(64), optional=True)  # None: permanent
    moderator_id: int = wire(UInt(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class Unban(StructPayload):
    """Ours: the reference defines the Unban opcode without a payload."""

    user_id: int = wire(UInt(64))
    moderator_id: int = wire(UInt(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class Kick(StructPayload):
    user_id: int = wire(UInt(64))
    reason: str = wire(Text())
    moderator_id: int = wire(UInt(64))


# --- content-addressed storage (ours: the reference lists the opcodes without payloads) -------


class ByteString(Bytes):
    """A CBOR byte string on output (decoders take arrays too): media blocks are up to 256 KiB,
    and an array of integers would double them on the wire."""

    def to_wire(self, value: Any, name: str) -> Any:  # bytes, where Bytes gives list[int]
        if not isinstance(value, bytes | bytearray | memoryview):
            raise PayloadEncodeError(f"{name}: expected bytes, got {type(value).__name__}")
        return self._check_size(bytes(value), name, PayloadEncodeError)


@dataclass(frozen=True, slots=True, kw_only=True)
class CasBlock(StructPayload):
    """CASPut (hash, data, blob_size: the plaintext size of the blob it belongs to, checked
    against the server's limit) and its answer (hash); CASGet (hash) and its answer (hash,
    data). ``hash`` is the BLAKE3-256 of ``data``, an encrypted block (see kalandra_core.media)."""

    hash: bytes = wire(Bytes(32))
    data: bytes | None = wire(ByteString(), optional=True)
    blob_size: int | None = wire(UInt(64), optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class CasHashes(StructPayload):
    """CASProof: which of these the room holds (the answer lists those); CASDelete: drop the
    room's references to these (the answer lists the ones dropped)."""

    hashes: list[bytes] = wire(ListOf(Bytes(32)))


# Opcode -> struct type for opcodes whose payload is always a CBOR map.
STRUCT_PAYLOADS: Final[dict[int, type[StructPayload]]] = {
    Opcode.HELLO: Hello,
    Opcode.HELLO_REPLY: HelloReply,
    Opcode.GOODBYE: Goodbye,
    Opcode.SYNC_REQUEST: SyncRequest,
    Opcode.SYNC_RESPONSE: SyncResponse,
    Opcode.ERROR: ErrorPayload,
    Opcode.APP_MESSAGE: EncryptedMessage,
    Opcode.APP_RECEIPT: Receipt,
    Opcode.APP_REACTION: Reaction,
    Opcode.REDACT: Redact,
    Opcode.BAN: Ban,
    Opcode.UNBAN: Unban,
    Opcode.KICK: Kick,
    Opcode.CAS_PUT: CasBlock,
    Opcode.CAS_GET: CasBlock,
    Opcode.CAS_DELETE: CasHashes,
    Opcode.CAS_PROOF: CasHashes,
}

# MLS opcodes: raw TLS MLS bytes, or the reference's CBOR wrapper when the payload is a map.
MLS_WRAPPERS: Final[dict[int, type[StructPayload]]] = {
    Opcode.KEY_PACKAGE: KeyPackageData,
    Opcode.PROPOSAL: ProposalData,
    Opcode.COMMIT: CommitData,
    Opcode.WELCOME: WelcomeData,
    Opcode.GROUP_INFO: GroupInfoData,
}

EMPTY_PAYLOADS: Final = frozenset({Opcode.PING, Opcode.PONG})


def is_cbor_map(data: bytes | bytearray | memoryview) -> bool:
    return len(data) > 0 and 0xA0 <= data[0] <= 0xBF


def decode_payload(opcode: int, data: bytes | bytearray | memoryview) -> Payload:
    """Decode ``data`` as the payload type of ``opcode``.

    Raises PayloadDecodeError (UnsupportedOpcode for opcodes that have no payload type).
    """
    struct_type = STRUCT_PAYLOADS.get(opcode)
    if struct_type is not None:
        return struct_type.decode(data)
    if opcode in EMPTY_PAYLOADS:
        return Empty()
    wrapper = MLS_WRAPPERS.get(opcode)
    if wrapper is not None:
        return wrapper.decode(data) if is_cbor_map(data) else RawPayload(bytes(data))
    raise UnsupportedOpcode(opcode)


def check_payload(opcode: int, data: bytes | bytearray | memoryview) -> None:
    """Raise PayloadDecodeError exactly when :func:`decode_payload` would, without building the
    payload when it is an AppMessage envelope of the usual shape (the sequencer checks every
    AppMessage this way: building it is half the cost)."""
    if opcode == Opcode.APP_MESSAGE and _plain_envelope(data):
        return
    decode_payload(opcode, data)


_ENVELOPE_KEYS: Final = frozenset({"epoch", "sender_index", "generation", "nonce", "ciphertext"})
_ENVELOPE_UINTS: Final = (("epoch", 1 << 64), ("sender_index", 1 << 32), ("generation", 1 << 32))


def _plain_envelope(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is a valid EncryptedMessage with text keys, no push keys and its bytes
    as arrays (what clients send); False leaves the judgement to the full decoder."""
    if usual_envelope(data):  # the usual layout, checked without decoding it
        return True
    try:
        obj = load_cbor(data)
    except PayloadDecodeError:
        return False
    if type(obj) is not dict or obj.keys() != _ENVELOPE_KEYS:
        return False
    for key, limit in _ENVELOPE_UINTS:
        value = obj[key]
        if type(value) is not int or not 0 <= value < limit:
            return False
    nonce, ciphertext = obj["nonce"], obj["ciphertext"]
    if type(nonce) is not list or len(nonce) != 24 or type(ciphertext) is not list:
        return False
    try:
        bytes(nonce)
        bytes(ciphertext)
    except (TypeError, ValueError):
        return False
    return True


def payload_from_json(opcode: int, obj: Any) -> Payload:
    """Inverse of ``payload.to_json()``: a JSON object for CBOR payloads, hex text for raw ones."""
    if isinstance(obj, str):
        try:
            return RawPayload(bytes.fromhex(obj))
        except ValueError:
            raise PayloadDecodeError("payload: not a hex string") from None
    struct_type = STRUCT_PAYLOADS.get(opcode) or MLS_WRAPPERS.get(opcode)
    if struct_type is not None:
        return struct_type.from_json(obj)
    if opcode in EMPTY_PAYLOADS and obj == {}:
        return Empty()
    raise UnsupportedOpcode(opcode)
