"""The storage interface of the Kalandra homeserver and the records it deals in.

One implementation (``sql.SqlStore``) serves SQLite and PostgreSQL; the schema lives in
``alembic/`` only. Rules every implementation keeps:

* The frame log is strict: log indexes of a room are dense from 0, with no holes and no double
  writes. ``append`` takes a batch whose first index must be the room's ``next_log_index``;
  anything else raises :class:`AppendConflict` and writes nothing.
* Everything one ``append`` carries (frames, epoch change, membership changes, commit index)
  commits in one transaction; the call returns only after that transaction is durable.
* Frame headers and payloads are stored apart; a redaction deletes the payload and keeps the
  header so the order stays intact.
* Device tokens are stored hashed (SHA-256); the plaintext is returned once, when issued.
* Login codes (``klc_`` + 21 base32 characters, 105 random bits) are stored hashed too, live at
  most :data:`LOGIN_CODE_MAX_TTL` seconds and redeem once: ``redeem_login_code`` deletes the
  code in the statement that reads it, so two concurrent redemptions cannot both succeed.
* A member's last-resort KeyPackage (at most one) is handed out by ``take_key_package`` only when
  the member has no other, and is never consumed (RFC 9420 section 16.8).
* ``append`` with no entries applies only its RoomChanges (roster changes the server learns
  outside the log, e.g. Welcome recipients in private-handshake rooms). Inside RoomChanges,
  removals and ban lifts apply before upserts and new bans.
* Leases (cluster mode, PostgreSQL): ``acquire_lease`` takes a room's lease only if it is free,
  expired or already the node's, and returns a fencing token greater than every earlier one of
  that room; expiry is judged by the store's clock (the database's ``now()``), never a node's.
  Every write a room's sequencer makes (``append``, ``redact``, ``put_welcome``,
  ``put_group_info``) may carry that token as ``fence``: it is checked under the lease row's
  lock inside the write's transaction, and a token that is no longer the room's raises
  :class:`Fenced` with nothing written. A write without ``fence`` is not checked (one process).
* Unknown rooms or members raise :class:`NotFound`; ``put_group_info`` never replaces a newer
  epoch with an older one; ``redact`` and ``welcome_delivered`` are idempotent.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from ..proto import Handshake

LOGIN_CODE_PREFIX: Final = "klc_"
LOGIN_CODE_MAX_TTL: Final = 600  # seconds
_LOGIN_CODE_BYTES: Final = 14  # 112 bits drawn, 105 kept: 21 base32 characters
_LOGIN_CODE_CHARS: Final = 21
_LOGIN_CODE_RE: Final = re.compile(rf"klc_[a-z2-7]{{{_LOGIN_CODE_CHARS}}}")


def device_token(random_bytes: Callable[[], bytes] = lambda: secrets.token_bytes(32)) -> str:
    """A new device token: 32 random bytes in URL-safe base64, never starting with "-", which a
    command line takes for an option (``kalandra login --token -x...`` would fail)."""
    while True:
        token = base64.urlsafe_b64encode(random_bytes()).rstrip(b"=").decode("ascii")
        if not token.startswith("-"):
            return token


def make_login_code(raw: bytes) -> str:
    """A login code from random bytes: the prefix and 21 lowercase base32 characters."""
    if len(raw) < _LOGIN_CODE_BYTES:
        raise ValueError("a login code needs 14 random bytes")
    text = base64.b32encode(raw[:_LOGIN_CODE_BYTES]).decode("ascii").lower()
    return LOGIN_CODE_PREFIX + text[:_LOGIN_CODE_CHARS]


def normalize_login_code(text: str) -> str | None:
    """The canonical form of a typed login code (case, spaces and dashes forgiven), or None if
    ``text`` is not shaped like one. Device tokens (43 characters) never are."""
    code = re.sub(r"[\s-]", "", text).lower()
    return code if _LOGIN_CODE_RE.fullmatch(code) else None


def login_code_hash(code: str) -> bytes:
    """What the store keeps of a (normalized) login code."""
    return hashlib.sha256(code.encode("ascii")).digest()


def check_login_code_ttl(ttl_seconds: int) -> None:
    if not 0 < ttl_seconds <= LOGIN_CODE_MAX_TTL:
        raise ValueError(f"a login code lives 1..{LOGIN_CODE_MAX_TTL} seconds")


class StoreError(Exception):
    pass


class AppendConflict(StoreError):
    """The batch does not start at the room's next log index (another writer, or a bug)."""

    def __init__(self, room_id: bytes, expected: int, got: int) -> None:
        super().__init__(
            f"room {room_id.hex()}: next log index is {expected}, batch starts at {got}"
        )
        self.expected = expected
        self.got = got


class NotFound(StoreError):
    pass


class Fenced(StoreError):
    """A write carried a lease token that is no longer the room's (another node has taken the
    room since): nothing was written, and the writer must stop sequencing the room."""

    def __init__(self, room_id: bytes, token: int, current: int | None) -> None:
        super().__init__(f"room {room_id.hex()}: lease token {token} is stale (now {current})")
        self.room_id = room_id
        self.token = token
        self.current = current


class AlreadyExists(StoreError):
    pass


class OverQuota(StoreError):
    """A media block would take its uploader past its quota (nothing was stored)."""

    def __init__(self, used: int, size: int, quota: int) -> None:
        super().__init__(f"{used} bytes held, {size} more would pass the quota of {quota}")
        self.used = used
        self.size = size
        self.quota = quota


@dataclass(frozen=True, slots=True)
class MediaPut:
    """One block for :meth:`Store.media_put_many` (the caller checked the digest)."""

    room_id: bytes
    digest: bytes
    data: bytes
    uploader_id: int


class Role(enum.IntEnum):
    # Kicked or banned: out of the room for the server (cannot send, gets nothing), while its
    # MLS leaf stays in the tree until a member commits the Remove; then the row goes.
    REMOVED = -1
    MEMBER = 0
    MODERATOR = 50
    OWNER = 100


@dataclass(frozen=True, slots=True)
class MemberAccount:
    """A native identity (one device): member id, name and its Ed25519 frame-signing key."""

    member_id: int
    name: str
    signature_key: bytes | None  # bound at the first authenticated Hello
    created_at: int  # Unix ms


@dataclass(frozen=True, slots=True)
class Room:
    room_id: bytes  # 16 bytes
    epoch: int
    next_log_index: int
    creator: int
    created_at: int  # Unix ms
    handshake: Handshake = Handshake.PUBLIC
    group_id: bytes = b""  # the MLS group id (not the room id)
    name: str = ""
    topic: str = ""


@dataclass(frozen=True, slots=True)
class RoomMember:
    member_id: int
    role: Role
    leaf_index: int | None  # MLS leaf, when the server can follow it (public handshakes)


@dataclass(frozen=True, slots=True)
class BanRecord:
    member_id: int
    moderator_id: int
    reason: str
    expires_at: int | None  # Unix ms; None = permanent


@dataclass(frozen=True, slots=True)
class RoomState:
    """Everything the sequencer needs to validate frames for one room."""

    room: Room
    members: dict[int, RoomMember]
    bans: dict[int, BanRecord]


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One sequenced frame ready to store: header (128 bytes, log index already written into
    context_id) and payload, plus the columns we index."""

    log_index: int
    opcode: int
    sender_id: int
    epoch: int
    header: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoredFrame:
    room_id: bytes
    log_index: int
    opcode: int
    sender_id: int
    epoch: int
    header: bytes
    payload: bytes | None  # None once redacted

    def encode(self) -> bytes:
        """The frame as it went out (a redacted frame keeps its header, empty payload)."""
        return self.header + (self.payload or b"")


@dataclass(slots=True)
class RoomChanges:
    """What one append does to the room besides adding frames (all in the same transaction)."""

    new_epoch: int | None = None  # set when the batch contains the commit that moved the epoch
    commit_log_index: int | None = None  # log index of that commit (commit index per epoch)
    upsert_members: list[RoomMember] = field(default_factory=list)
    remove_members: list[int] = field(default_factory=list)
    set_bans: list[BanRecord] = field(default_factory=list)
    lift_bans: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """The answer of :meth:`Store.acquire_lease`: ``token`` is the new fencing token if the
    lease is now the caller's, else None; ``owner`` is who holds it now."""

    token: int | None
    owner: str


@dataclass(frozen=True, slots=True)
class Welcome:
    welcome_id: int
    room_id: bytes
    recipient_id: int
    frame: bytes  # the whole Welcome frame as it will be delivered


class Store(Protocol):
    # --- lifecycle ---------------------------------------------------------------------------
    async def close(self) -> None: ...

    # --- accounts ----------------------------------------------------------------------------
    async def create_member(self, name: str) -> MemberAccount:
        """A new account with a random non-zero u64 member id; AlreadyExists if name is taken."""
        ...

    async def get_member(self, member_id: int) -> MemberAccount | None: ...

    async def find_member(self, name: str) -> MemberAccount | None: ...

    async def list_members(self) -> list[MemberAccount]: ...

    async def set_signature_key(self, member_id: int, key: bytes) -> None: ...

    async def issue_token(self, member_id: int) -> str:
        """A new device token (URL-safe text); only its SHA-256 is stored."""
        ...

    async def authenticate(self, token: str) -> int | None:
        """The member id of a valid, unrevoked token, else None."""
        ...

    async def revoke_tokens(self, member_id: int) -> int:
        """Revoke every token of the member; returns how many were revoked."""
        ...

    async def issue_login_code(
        self, member_id: int, ttl_seconds: int = LOGIN_CODE_MAX_TTL, *, now_ms: int | None = None
    ) -> str:
        """A new single-use login code for the member, valid ``ttl_seconds`` (at most
        :data:`LOGIN_CODE_MAX_TTL`) from ``now_ms`` (default: now); only its SHA-256 is stored.
        NotFound for an unknown member. Expired codes are purged on the way."""
        ...

    async def redeem_login_code(self, code: str, now_ms: int) -> int | None:
        """Consume the code atomically: the member id if it existed and had not expired at
        ``now_ms``, else None. The code is gone either way (a second redemption gets None)."""
        ...

    # --- rooms ---------------------------------------------------------------------------------
    async def create_room(self, room: Room, creator: RoomMember) -> None:
        """AlreadyExists if the room id is taken."""
        ...

    async def load_room(self, room_id: bytes) -> RoomState | None: ...

    async def rooms_of(self, member_id: int) -> list[bytes]:
        """Room ids where the member is in the roster."""
        ...

    async def log_heads(self) -> dict[bytes, int]:
        """Every room's ``next_log_index`` now, by room id."""
        ...

    async def update_room_metadata(self, room_id: bytes, *, name: str, topic: str) -> None: ...

    # --- the log ---------------------------------------------------------------------------------
    async def append(
        self,
        room_id: bytes,
        entries: Sequence[LogEntry],
        changes: RoomChanges | None = None,
        *,
        fence: int | None = None,
    ) -> None:
        """Strict, atomic, durable append (see module docstring); Fenced if ``fence`` is not
        the room's lease token."""
        ...

    async def load_frames(self, room_id: bytes, from_index: int, limit: int) -> list[StoredFrame]:
        """Frames [from_index, from_index + limit) in order; empty past the end."""
        ...

    async def commits_between(
        self, room_id: bytes, from_epoch: int, to_epoch: int
    ) -> list[StoredFrame]:
        """The commits that moved the room from ``from_epoch`` up to ``to_epoch``, in order."""
        ...

    async def redact(self, room_id: bytes, log_index: int, *, fence: int | None = None) -> bool:
        """Delete a stored payload; False if there is no such frame."""
        ...

    # --- welcome mailbox ---------------------------------------------------------------------
    async def put_welcome(
        self, room_id: bytes, recipient_id: int, frame: bytes, *, fence: int | None = None
    ) -> int: ...

    async def pending_welcomes(self, recipient_id: int) -> list[Welcome]: ...

    async def welcome_delivered(self, welcome_id: int) -> None: ...

    # --- key packages and group info ---------------------------------------------------------
    async def publish_key_packages(self, member_id: int, key_packages: Sequence[bytes]) -> int:
        """Store KeyPackages (duplicates ignored); returns how many the member now has (not
        counting the last-resort one)."""
        ...

    async def set_last_resort_key_package(self, member_id: int, key_package: bytes) -> None:
        """Keep ``key_package`` as the member's last-resort KeyPackage (replacing any older
        one). NotFound for an unknown member."""
        ...

    async def take_key_package(self, member_id: int) -> bytes | None:
        """Remove and return one of the member's KeyPackages (oldest first); when none is left,
        the last-resort one (kept), else None."""
        ...

    async def key_package_count(self, member_id: int) -> int:
        """How many consumable KeyPackages the member has (the last-resort one not counted)."""
        ...

    async def put_group_info(
        self, room_id: bytes, epoch: int, group_info: bytes, *, fence: int | None = None
    ) -> None: ...

    async def get_group_info(self, room_id: bytes) -> tuple[int, bytes] | None: ...

    # --- media: encrypted blocks by hash, reached through a room's references ----------------
    async def media_put(
        self,
        room_id: bytes,
        digest: bytes,
        data: bytes,
        uploader_id: int,
        quota: int | None = None,
    ) -> bool:
        """Store a block (kept once per digest; the caller checked the digest) and the room's
        reference to it for this uploader. True if the block was new to the server; NotFound
        for an unknown room. With ``quota``, OverQuota (and nothing stored) when a new
        reference would take the uploader's usage (:meth:`media_usage`) past it."""
        ...

    async def media_put_many(
        self, puts: Sequence[MediaPut], quota: int | None = None
    ) -> list[bool | NotFound | OverQuota]:
        """:meth:`media_put` of each block in order, in one transaction (one durable write for
        the lot: group commit). Each result is what ``media_put`` would have returned or
        raised: True (new to the server), False, or the NotFound / OverQuota refusing that
        block (nothing of it stored; the others are). Quota: a block counts against its
        uploader's usage as it would had the puts come one by one."""
        ...

    async def media_usage(self, uploader_id: int) -> int:
        """Bytes a member holds: the size of each block it references, once per room (a block
        shared with others counts in full for each holder: each reference keeps it stored)."""
        ...

    async def media_get(self, room_id: bytes, digest: bytes) -> bytes | None:
        """The block, if the room references it."""
        ...

    async def media_get_many(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes | None]:
        """:meth:`media_get` of each digest (in one read)."""
        ...

    async def media_present(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes]:
        """Those of ``digests`` the room references, in the order given (no repeats)."""
        ...

    async def media_release(
        self, room_id: bytes, digests: Sequence[bytes], uploader_id: int | None
    ) -> list[bytes]:
        """Drop the room's references to ``digests`` (the uploader's; None: everyone's); a
        block no reference holds any more is deleted. Returns the digests that lost one."""
        ...

    async def media_refcount(self, digest: bytes) -> int:
        """How many references hold the block (0: not stored)."""
        ...

    # --- room leases (cluster mode) -----------------------------------------------------------
    async def acquire_lease(self, room_id: bytes, node: str, seconds: float) -> LeaseGrant:
        """Take the room's lease for ``seconds`` if it is free, expired or ``node``'s already
        (a node started again under its name need not wait); each success returns a new,
        greater token. Otherwise the token is None and ``owner`` names the holder."""
        ...

    async def renew_leases(self, node: str, held: dict[bytes, int], seconds: float) -> list[bytes]:
        """Extend every lease in ``held`` (room -> token) that is still ``node``'s with that
        token, in one statement; returns the rooms of ``held`` that were lost."""
        ...

    async def release_lease(self, room_id: bytes, node: str, token: int) -> None:
        """Let the lease expire now (the row and its token stay: tokens never go back)."""
        ...

    async def lease_owner(self, room_id: bytes) -> str | None:
        """Who holds an unexpired lease on the room, if anyone."""
        ...

    async def hand_over_lease(
        self, room_id: bytes, node: str, token: int, to: str, seconds: float
    ) -> bool:
        """Give ``node``'s lease (with ``token``, unexpired) to node ``to``, if ``to`` is alive
        (``node_alive``), for ``seconds``, with a new, greater token; whether it was given."""
        ...

    async def node_alive(self, node: str, seconds: float) -> dict[str, int]:
        """Mark ``node`` alive for ``seconds`` (0: gone now); returns every live node with the
        number of unexpired leases it holds."""
        ...

    async def leases_of(self, node: str) -> list[bytes]:
        """The rooms whose unexpired lease names ``node``."""
        ...

    async def record_bridge_bot(self, member_id: int, mxid: str) -> None:
        """Record the embedded bridge's bot (member id, Matrix user id) for the other
        processes of a cluster (replacing any earlier record)."""
        ...

    async def bridge_bot(self) -> tuple[int, str] | None:
        """The bridge's bot as recorded, if any."""
        ...

    async def forget_bridge_bot(self) -> bool:
        """Delete the record of the bridge's bot (the bridge left the cluster); whether there
        was one."""
        ...
