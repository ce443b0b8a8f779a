"""``MemoryStore``: the :class:`~kalandra_core.storage.base.Store` in process memory.

For tests and deterministic simulation: the same semantics as ``SqlStore`` (strict dense
appends raising :class:`AppendConflict`, one atomic step per ``append`` with removals and ban
lifts before upserts and new bans, redaction that keeps the header, the welcome mailbox,
KeyPackages oldest first, tokens kept only as SHA-256) and no durability at all. Every method
validates everything before it changes anything, so a failed call leaves the store untouched.

``rng`` (seeded) makes member ids and tokens reproducible; ``clock`` stamps ``created_at`` and
is the "database clock" that judges lease expiry (a simulation passes virtual time, and several
simulated nodes share one store as they would share one PostgreSQL).
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import (
    LOGIN_CODE_MAX_TTL,
    AlreadyExists,
    AppendConflict,
    BanRecord,
    Fenced,
    LeaseGrant,
    LogEntry,
    MediaPut,
    MemberAccount,
    NotFound,
    OverQuota,
    Room,
    RoomChanges,
    RoomMember,
    RoomState,
    StoredFrame,
    StoreError,
    Welcome,
    check_login_code_ttl,
    device_token,
    login_code_hash,
    make_login_code,
    normalize_login_code,
)

_U64 = 1 << 64


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _check_u64(values: Iterable[int]) -> None:
    """What the SQL columns enforce: member ids are u64 (the error names no other value)."""
    for value in values:
        if not 0 <= value < _U64:
            raise StoreError("database error: StatementError") from ValueError(
                f"not a u64: {value}"
            )


@dataclass(slots=True)
class _Token:
    member_id: int
    revoked_at: int | None = None


@dataclass(slots=True)
class _Lease:
    owner: str
    token: int
    expires_at: float  # the store's clock, seconds


@dataclass(slots=True)
class _Room:
    room: Room
    members: dict[int, RoomMember]
    bans: dict[int, BanRecord] = field(default_factory=dict)
    headers: list[bytes] = field(default_factory=list)  # index = log index
    columns: list[tuple[int, int, int]] = field(default_factory=list)  # opcode, sender, epoch
    payloads: dict[int, bytes] = field(default_factory=dict)  # redacted frames have none
    commit_index: dict[int, int] = field(default_factory=dict)  # epoch -> log index
    group_info: tuple[int, bytes] | None = None

    def frame(self, log_index: int) -> StoredFrame:
        opcode, sender, epoch = self.columns[log_index]
        return StoredFrame(
            room_id=self.room.room_id,
            log_index=log_index,
            opcode=opcode,
            sender_id=sender,
            epoch=epoch,
            header=self.headers[log_index],
            payload=self.payloads.get(log_index),
        )


class MemoryStore:
    """The homeserver store without a database; ``await MemoryStore.open()`` or construct."""

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self._members: dict[int, MemberAccount] = {}
        self._by_name: dict[str, int] = {}
        self._tokens: dict[bytes, _Token] = {}
        self._login_codes: dict[bytes, tuple[int, int]] = {}  # sha256 -> (member, expires_at)
        self._rooms: dict[bytes, _Room] = {}
        self._welcomes: dict[int, Welcome] = {}
        self._welcome_ids = 0
        # kp_id -> (member, sha256, key package); dict order is kp_id order (oldest first)
        self._key_packages: dict[int, tuple[int, bytes, bytes]] = {}
        self._kp_ids = 0
        self._last_resort: dict[int, bytes] = {}  # member -> its last-resort KeyPackage
        self._media: dict[bytes, bytes] = {}  # digest -> block
        self._media_refs: set[tuple[bytes, bytes, int]] = set()  # (room, digest, uploader)
        self._leases: dict[bytes, _Lease] = {}
        self._nodes: dict[str, float] = {}  # cluster node -> alive until
        self._bridge_bot: tuple[int, str] | None = None  # the cluster's bridge, as recorded

    @classmethod
    async def open(
        cls, *, rng: random.Random | None = None, clock: Callable[[], float] = time.time
    ) -> MemoryStore:
        return cls(rng=rng, clock=clock)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _randbits(self, bits: int) -> int:
        return self._rng.getrandbits(bits) if self._rng is not None else secrets.randbits(bits)

    def _room(self, room_id: bytes) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            raise NotFound(f"room {room_id.hex()}")
        return room

    async def close(self) -> None:
        pass

    # --- accounts ----------------------------------------------------------------------------
    async def create_member(self, name: str) -> MemberAccount:
        if name in self._by_name:
            raise AlreadyExists(f"member name {name!r} is taken")
        for _ in range(8):
            member_id = self._randbits(64)
            if member_id == 0 or member_id in self._members:
                continue
            account = MemberAccount(member_id, name, None, self._now_ms())
            self._members[member_id] = account
            self._by_name[name] = member_id
            return account
        raise StoreError("could not allocate a member id")

    async def get_member(self, member_id: int) -> MemberAccount | None:
        return self._members.get(member_id)

    async def find_member(self, name: str) -> MemberAccount | None:
        member_id = self._by_name.get(name)
        return None if member_id is None else self._members[member_id]

    async def list_members(self) -> list[MemberAccount]:
        return sorted(self._members.values(), key=lambda m: m.name)

    async def set_signature_key(self, member_id: int, key: bytes) -> None:
        account = self._members.get(member_id)
        if account is None:
            raise NotFound(f"member {member_id}")
        self._members[member_id] = MemberAccount(
            account.member_id, account.name, bytes(key), account.created_at
        )

    async def issue_token(self, member_id: int) -> str:
        if member_id not in self._members:
            raise NotFound(f"member {member_id}")
        rng = self._rng
        if rng is not None:
            token = device_token(lambda: rng.getrandbits(256).to_bytes(32, "big"))
        else:
            token = device_token()
        self._tokens[_token_hash(token)] = _Token(member_id)
        return token

    async def authenticate(self, token: str) -> int | None:
        entry = self._tokens.get(_token_hash(token))
        if entry is None or entry.revoked_at is not None:
            return None
        return entry.member_id

    async def revoke_tokens(self, member_id: int) -> int:
        now = self._now_ms()
        count = 0
        for entry in self._tokens.values():
            if entry.member_id == member_id and entry.revoked_at is None:
                entry.revoked_at = now
                count += 1
        return count

    async def issue_login_code(
        self, member_id: int, ttl_seconds: int = LOGIN_CODE_MAX_TTL, *, now_ms: int | None = None
    ) -> str:
        check_login_code_ttl(ttl_seconds)
        if member_id not in self._members:
            raise NotFound(f"member {member_id}")
        now = self._now_ms() if now_ms is None else now_ms
        for digest, (_, expires_at) in list(self._login_codes.items()):
            if expires_at <= now:
                del self._login_codes[digest]
        code = make_login_code(self._randbits(112).to_bytes(14, "big"))
        self._login_codes[login_code_hash(code)] = (member_id, now + ttl_seconds * 1000)
        return code

    async def redeem_login_code(self, code: str, now_ms: int) -> int | None:
        normal = normalize_login_code(code)
        if normal is None:
            return None
        found = self._login_codes.pop(login_code_hash(normal), None)
        if found is None or found[1] <= now_ms:
            return None
        return found[0]

    # --- rooms ---------------------------------------------------------------------------------
    async def create_room(self, room: Room, creator: RoomMember) -> None:
        if len(room.room_id) != 16:
            raise ValueError("room ids are 16 bytes")
        if room.room_id in self._rooms:
            raise AlreadyExists(f"room {room.room_id.hex()}")
        _check_u64([room.creator, creator.member_id])
        self._rooms[room.room_id] = _Room(room, {creator.member_id: creator})

    async def load_room(self, room_id: bytes) -> RoomState | None:
        stored = self._rooms.get(room_id)
        if stored is None:
            return None
        return RoomState(room=stored.room, members=dict(stored.members), bans=dict(stored.bans))

    async def rooms_of(self, member_id: int) -> list[bytes]:
        return sorted(rid for rid, r in self._rooms.items() if member_id in r.members)

    async def log_heads(self) -> dict[bytes, int]:
        return {rid: r.room.next_log_index for rid, r in self._rooms.items()}

    async def update_room_metadata(self, room_id: bytes, *, name: str, topic: str) -> None:
        stored = self._room(room_id)
        r = stored.room
        stored.room = Room(
            r.room_id,
            r.epoch,
            r.next_log_index,
            r.creator,
            r.created_at,
            r.handshake,
            r.group_id,
            name,
            topic,
        )

    # --- the log ---------------------------------------------------------------------------------
    async def append(
        self,
        room_id: bytes,
        entries: Sequence[LogEntry],
        changes: RoomChanges | None = None,
        *,
        fence: int | None = None,
    ) -> None:
        changes = changes or RoomChanges()
        self._check_fence(room_id, fence)
        # Validate everything first (the SQL transaction rolls back; here nothing is touched).
        start = entries[0].log_index if entries else 0
        for offset, entry in enumerate(entries):
            if entry.log_index != start + offset:
                raise AppendConflict(room_id, start + offset, entry.log_index)
        commit_epoch: int | None = None
        if changes.commit_log_index is not None:
            if not entries or not start <= changes.commit_log_index < start + len(entries):
                raise ValueError("commit_log_index is not in this batch")
            commit_epoch = entries[changes.commit_log_index - start].epoch
        stored = self._room(room_id)
        next_index = stored.room.next_log_index
        if entries and start != next_index:
            raise AppendConflict(room_id, next_index, start)
        _check_u64(e.sender_id for e in entries)
        _check_u64(m.member_id for m in changes.upsert_members)
        _check_u64(changes.remove_members)
        _check_u64(b for ban in changes.set_bans for b in (ban.member_id, ban.moderator_id))
        _check_u64(changes.lift_bans)
        if commit_epoch is not None and commit_epoch in stored.commit_index:
            raise StoreError(f"room {room_id.hex()}: epoch {commit_epoch} already has a commit")
        # Apply.
        for entry in entries:
            stored.headers.append(bytes(entry.header))
            stored.columns.append((entry.opcode, entry.sender_id, entry.epoch))
            stored.payloads[entry.log_index] = bytes(entry.payload)
        if commit_epoch is not None and changes.commit_log_index is not None:
            stored.commit_index[commit_epoch] = changes.commit_log_index
        r = stored.room
        stored.room = Room(
            r.room_id,
            r.epoch if changes.new_epoch is None else changes.new_epoch,
            next_index + len(entries),
            r.creator,
            r.created_at,
            r.handshake,
            r.group_id,
            r.name,
            r.topic,
        )
        # Removals and lifts before upserts and bans: a batch may remove and re-add one member.
        for member_id in changes.remove_members:
            stored.members.pop(member_id, None)
        for member in changes.upsert_members:
            stored.members[member.member_id] = member
        for member_id in changes.lift_bans:
            stored.bans.pop(member_id, None)
        for ban in changes.set_bans:
            stored.bans[ban.member_id] = ban

    async def load_frames(self, room_id: bytes, from_index: int, limit: int) -> list[StoredFrame]:
        stored = self._rooms.get(room_id)
        if stored is None or limit <= 0:
            return []
        first = max(0, from_index)
        last = min(len(stored.headers), from_index + limit)
        return [stored.frame(i) for i in range(first, last)]

    async def commits_between(
        self, room_id: bytes, from_epoch: int, to_epoch: int
    ) -> list[StoredFrame]:
        # The commit indexed at epoch e is the one sent in epoch e: it moved the room to e + 1.
        stored = self._rooms.get(room_id)
        if stored is None:
            return []
        return [
            stored.frame(stored.commit_index[e])
            for e in sorted(stored.commit_index)
            if from_epoch <= e < to_epoch
        ]

    async def redact(self, room_id: bytes, log_index: int, *, fence: int | None = None) -> bool:
        self._check_fence(room_id, fence)
        stored = self._rooms.get(room_id)
        if stored is None or not 0 <= log_index < len(stored.headers):
            return False
        stored.payloads.pop(log_index, None)
        return True

    # --- welcome mailbox ---------------------------------------------------------------------
    async def put_welcome(
        self, room_id: bytes, recipient_id: int, frame: bytes, *, fence: int | None = None
    ) -> int:
        self._check_fence(room_id, fence)
        self._room(room_id)
        _check_u64([recipient_id])
        self._welcome_ids += 1
        welcome_id = self._welcome_ids
        self._welcomes[welcome_id] = Welcome(welcome_id, room_id, recipient_id, bytes(frame))
        return welcome_id

    async def pending_welcomes(self, recipient_id: int) -> list[Welcome]:
        return [w for w in self._welcomes.values() if w.recipient_id == recipient_id]

    async def welcome_delivered(self, welcome_id: int) -> None:
        self._welcomes.pop(welcome_id, None)

    # --- key packages and group info ---------------------------------------------------------
    async def publish_key_packages(self, member_id: int, key_packages: Sequence[bytes]) -> int:
        unique = {hashlib.sha256(kp).digest(): bytes(kp) for kp in key_packages}
        if unique and member_id not in self._members:
            raise NotFound(f"member {member_id}")
        have = {digest for owner, digest, _ in self._key_packages.values() if owner == member_id}
        for digest, kp in unique.items():
            if digest not in have:
                self._kp_ids += 1
                self._key_packages[self._kp_ids] = (member_id, digest, kp)
        return await self.key_package_count(member_id)

    async def set_last_resort_key_package(self, member_id: int, key_package: bytes) -> None:
        if member_id not in self._members:
            raise NotFound(f"member {member_id}")
        self._last_resort[member_id] = bytes(key_package)

    async def take_key_package(self, member_id: int) -> bytes | None:
        for kp_id, (owner, _digest, kp) in self._key_packages.items():
            if owner == member_id:
                del self._key_packages[kp_id]
                return kp
        return self._last_resort.get(member_id)

    async def key_package_count(self, member_id: int) -> int:
        return sum(1 for owner, _, _ in self._key_packages.values() if owner == member_id)

    async def put_group_info(
        self, room_id: bytes, epoch: int, group_info: bytes, *, fence: int | None = None
    ) -> None:
        """Keep the newest: a GroupInfo for an older epoch never replaces a newer one."""
        self._check_fence(room_id, fence)
        stored = self._room(room_id)
        if stored.group_info is None or stored.group_info[0] <= epoch:
            stored.group_info = (epoch, bytes(group_info))

    async def get_group_info(self, room_id: bytes) -> tuple[int, bytes] | None:
        stored = self._rooms.get(room_id)
        return None if stored is None else stored.group_info

    # --- media ---------------------------------------------------------------------------------
    async def media_put(
        self,
        room_id: bytes,
        digest: bytes,
        data: bytes,
        uploader_id: int,
        quota: int | None = None,
    ) -> bool:
        self._room(room_id)
        _check_u64([uploader_id])
        if quota is not None and (room_id, digest, uploader_id) not in self._media_refs:
            used = await self.media_usage(uploader_id)
            if used + len(data) > quota:
                raise OverQuota(used, len(data), quota)
        new = digest not in self._media
        if new:
            self._media[digest] = bytes(data)
        self._media_refs.add((room_id, digest, uploader_id))
        return new

    async def media_put_many(
        self, puts: Sequence[MediaPut], quota: int | None = None
    ) -> list[bool | NotFound | OverQuota]:
        results: list[bool | NotFound | OverQuota] = []
        for p in puts:
            try:
                results.append(
                    await self.media_put(p.room_id, p.digest, p.data, p.uploader_id, quota)
                )
            except (NotFound, OverQuota) as exc:
                results.append(exc)
        return results

    async def media_get(self, room_id: bytes, digest: bytes) -> bytes | None:
        held = any(r == room_id and d == digest for r, d, _ in self._media_refs)
        return self._media.get(digest) if held else None

    async def media_get_many(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes | None]:
        return [await self.media_get(room_id, d) for d in digests]

    async def media_present(self, room_id: bytes, digests: Sequence[bytes]) -> list[bytes]:
        held = {d for r, d, _ in self._media_refs if r == room_id}
        return [d for d in dict.fromkeys(digests) if d in held]

    async def media_release(
        self, room_id: bytes, digests: Sequence[bytes], uploader_id: int | None
    ) -> list[bytes]:
        wanted = set(digests)
        gone = {
            ref
            for ref in self._media_refs
            if ref[0] == room_id and ref[1] in wanted and uploader_id in (None, ref[2])
        }
        self._media_refs -= gone
        for _, digest, _ in gone:
            if await self.media_refcount(digest) == 0:
                self._media.pop(digest, None)
        dropped = {d for _, d, _ in gone}
        return [d for d in dict.fromkeys(digests) if d in dropped]

    async def media_refcount(self, digest: bytes) -> int:
        return sum(1 for _, d, _ in self._media_refs if d == digest)

    async def media_usage(self, uploader_id: int) -> int:
        return sum(len(self._media[d]) for _, d, u in self._media_refs if u == uploader_id)

    # --- room leases (cluster mode) -----------------------------------------------------------
    def _check_fence(self, room_id: bytes, fence: int | None) -> None:
        if fence is None:
            return
        lease = self._leases.get(room_id)
        if lease is None or lease.token != fence:
            raise Fenced(room_id, fence, None if lease is None else lease.token)

    async def acquire_lease(self, room_id: bytes, node: str, seconds: float) -> LeaseGrant:
        now = self._clock()
        lease = self._leases.get(room_id)
        if lease is not None and lease.expires_at > now and lease.owner != node:
            return LeaseGrant(None, lease.owner)
        token = 1 if lease is None else lease.token + 1
        self._leases[room_id] = _Lease(node, token, now + seconds)
        return LeaseGrant(token, node)

    async def renew_leases(self, node: str, held: dict[bytes, int], seconds: float) -> list[bytes]:
        now = self._clock()
        lost: list[bytes] = []
        for room_id, token in held.items():
            lease = self._leases.get(room_id)
            if lease is None or lease.owner != node or lease.token != token:
                lost.append(room_id)
            else:
                lease.expires_at = now + seconds
        return lost

    async def release_lease(self, room_id: bytes, node: str, token: int) -> None:
        lease = self._leases.get(room_id)
        if lease is not None and lease.owner == node and lease.token == token:
            lease.expires_at = self._clock() - 1.0

    async def lease_owner(self, room_id: bytes) -> str | None:
        lease = self._leases.get(room_id)
        return lease.owner if lease is not None and lease.expires_at > self._clock() else None

    async def hand_over_lease(
        self, room_id: bytes, node: str, token: int, to: str, seconds: float
    ) -> bool:
        now = self._clock()
        lease = self._leases.get(room_id)
        if lease is None or lease.owner != node or lease.token != token:
            return False
        if lease.expires_at <= now or self._nodes.get(to, now) <= now:
            return False
        self._leases[room_id] = _Lease(to, token + 1, now + seconds)
        return True

    async def node_alive(self, node: str, seconds: float) -> dict[str, int]:
        now = self._clock()
        self._nodes[node] = now + seconds
        live = {n: 0 for n, until in self._nodes.items() if until > now}
        for lease in self._leases.values():
            if lease.owner in live and lease.expires_at > now:
                live[lease.owner] += 1
        return live

    async def leases_of(self, node: str) -> list[bytes]:
        now = self._clock()
        return [
            r
            for r, lease in self._leases.items()
            if lease.owner == node and lease.expires_at > now
        ]

    async def record_bridge_bot(self, member_id: int, mxid: str) -> None:
        self._bridge_bot = (member_id, mxid)

    async def bridge_bot(self) -> tuple[int, str] | None:
        return self._bridge_bot

    async def forget_bridge_bot(self) -> bool:
        had, self._bridge_bot = self._bridge_bot is not None, None
        return had


if TYPE_CHECKING:
    from .base import Store

    def _conforms(store: MemoryStore) -> Store:  # mypy checks MemoryStore against the protocol
        return store
