"""The server's core: who is connected, which rooms are live, and where each frame goes.

Room frames go to the room's :class:`RoomWorker` (the one writer of its log). The hub itself
answers what needs no sequencing: room creation from a GroupInfo, sync reads, and the
KeyPackage directory. Deliveries go to every session of the member ids a decision names.

In a cluster (``cluster`` given), a room has a worker here only while this node holds its
lease. :meth:`Hub.route` decides where a room frame goes: the local worker; another node known
to own the room (the frame is forwarded there, its answers come back to the session); or, when
no live lease exists, this node takes the lease, loads the room from the log and serves it.
Fan-out reaches the sessions on the other nodes through the bus. :meth:`Hub.hand_over` gives
a room to another node (rebalancing) without losing, doubling or reordering a frame.

Tests only: ``KALANDRA_TEST_SYNC_LAG`` (seconds) delays each sync read, the latency of a busy
store, so that a test can hold a client's catch-up of many rooms open.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from nacl.signing import SigningKey, VerifyKey

from ..mls._lib import crypto_for_suite
from ..mls.errors import InvalidMlsMessage
from ..mls.keypackage import is_last_resort, key_package_member_id, parse_key_package
from ..mls.server_view import inspect_group_info
from ..proto import (
    ErrorCode,
    Frame,
    Handshake,
    KeyPackageData,
    Opcode,
    PayloadDecodeError,
    RawPayload,
    SyncRequest,
    SyncResponse,
    decode_payload,
)
from ..proto.hello_proof import ReplayCache
from ..proto.hlc import skew_ms
from ..proto.payloads import GroupInfoData
from ..storage.base import AlreadyExists, Role, Room, RoomMember, Store, StoreError
from ..transport.interface import FrameSink
from . import replies
from .bus import Forward
from .cluster import MAX_HOPS, NO_ANSWER, Asker, ClusterNode, RemoteSession
from .config import ServerConfig
from .ratelimit import TokenBucket
from .room import RoomSequencer
from .session import ServerSession
from .workers import MOVED, Moved, RoomWorker

log = logging.getLogger("kalandra.server")
_SYNC_LAG = float(os.environ.get("KALANDRA_TEST_SYNC_LAG", "0") or 0)  # tests only (see above)

ROOM_OPCODES = frozenset(
    {
        Opcode.APP_MESSAGE,
        Opcode.APP_RECEIPT,
        Opcode.APP_REACTION,
        Opcode.APP_EDIT,
        Opcode.APP_DELETE,
        Opcode.TYPING,
        Opcode.PRESENCE,
        Opcode.COMMIT,
        Opcode.PROPOSAL,
        Opcode.WELCOME,
        Opcode.REDACT,
        Opcode.BAN,
        Opcode.UNBAN,
        Opcode.KICK,
    }
)


class Hub:
    def __init__(
        self,
        store: Store,
        config: ServerConfig,
        server_key: SigningKey,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.cluster = cluster
        self.monotonic = monotonic  # timeouts and rate limits (simulations pass virtual time)
        self.store = store
        self.config = config
        self.server_key = server_key
        self.server_public_key = bytes(server_key.verify_key)
        self.clock = clock
        self.sessions: dict[int, ServerSession] = {}
        self.by_member: dict[int, set[ServerSession]] = {}
        self.rooms: dict[bytes, RoomWorker] = {}
        # Rooms being opened: a lock each, and how many wait on it (dropped at 0, so room ids
        # that name no room leave nothing behind).
        self._opening: dict[bytes, tuple[asyncio.Lock, list[int]]] = {}
        # Rooms being handed over: their frames wait here, in arrival order, until the lease
        # is the taker's (session, frame, hops, attempts).
        self._moving: dict[bytes, deque[tuple[Asker, Frame, int, int]]] = {}
        self._keys: dict[int, VerifyKey] = {}
        self._kp_fetches: dict[int, TokenBucket] = {}  # requester -> its KeyPackage fetches
        # Hellos accepted within the clock skew window: a captured Hello is not accepted twice.
        self.hello_replays = ReplayCache(config.limits.max_clock_skew_ms)
        self._sweeper: asyncio.Task[None] | None = None
        # (member id, Matrix user id) of the bot of the Matrix bridge that embeds this server,
        # told to every client in HelloReply; None for a server alone.
        self.bridge_bot: tuple[int, str] | None = None
        self.bridge_here = False  # the bridge is embedded in this process (announce_bridge_bot)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="session-sweeper")

    async def start_cluster(self) -> None:
        if self.cluster is not None:
            await self.cluster.start(self)

    async def announce_bridge_bot(self, member_id: int, mxid: str) -> None:
        """The embedding bridge's bot, named to this server's clients in HelloReply; in a
        cluster also recorded for the other processes, which name it to theirs."""
        self.bridge_bot = (member_id, mxid)
        self.bridge_here = True
        if self.cluster is not None:
            await self.store.record_bridge_bot(member_id, mxid)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions.values()):
            session.close("server shutting down")
        for worker in list(self.rooms.values()):
            await worker.stop()
        if self.cluster is not None:
            await self.cluster.stop()

    def session_factory(self, sink: FrameSink) -> ServerSession:
        """Transports call this for each new connection."""
        session = ServerSession(self, sink)
        if len(self.sessions) >= self.config.limits.max_connections:
            session.send(replies.error(ErrorCode.QUOTA_EXCEEDED, "too many connections"))
            session.close("max connections exceeded")
            return session
        self.sessions[session.session_id] = session
        return session

    def bus_gap(self) -> None:
        """The cluster bus's listener is back after a gap: fan-out for this node's sessions may
        be lost, and nothing says which. Every session here is ended; its client reconnects
        (to any node), syncs each room from the last index it saw and is handed its pending
        Welcomes, as after any reconnect. Ending them, rather than telling each what it missed,
        because only the client knows where it stands: a member removed meanwhile is in no
        fan-out any more, and a lost Welcome is handed out only on a Hello. A gap needs the
        node's database connection lost, which is rare; the price is one reconnect each."""
        if self.sessions:
            log.warning("cluster bus gap: ending %d session(s) to resync", len(self.sessions))
        for session in list(self.sessions.values()):
            session.close("cluster bus gap; reconnect to resync")

    async def _sweep(self) -> None:
        limits = self.config.limits
        while True:
            await asyncio.sleep(min(5.0, limits.idle_timeout / 4))
            now = self.monotonic()
            for session in list(self.sessions.values()):
                if (
                    not session.authenticated
                    and now - session.connected_at > limits.handshake_timeout
                ):
                    session.close("handshake timeout")
                elif now - session.last_seen > limits.idle_timeout:
                    session.close("idle timeout")

    # --- sessions and members ----------------------------------------------------------------

    def session_gone(self, session: ServerSession) -> None:
        self.sessions.pop(session.session_id, None)
        peers = self.by_member.get(session.member_id)
        if peers is not None:
            peers.discard(session)
            if not peers:
                del self.by_member[session.member_id]

    async def session_authenticated(self, session: ServerSession) -> None:
        self.by_member.setdefault(session.member_id, set()).add(session)
        # Kept until the member shows it joined (its first sync of that room, see _sync): a
        # Welcome handed to a connection that then died must not be lost.
        for welcome in await self.store.pending_welcomes(session.member_id):
            # Not to a member kicked, banned or removed since: a Welcome reads the room too.
            view = await self.room_view(welcome.room_id)
            if view is not None and view.is_member(session.member_id):
                session.send(welcome.frame)

    async def signature_key(self, member_id: int) -> VerifyKey | None:
        key = self._keys.get(member_id)
        if key is None:
            account = await self.store.get_member(member_id)
            if account is None or account.signature_key is None:
                return None
            key = self._keys[member_id] = VerifyKey(account.signature_key)
        return key

    async def bind_signature_key(self, member_id: int, offered: bytes | None) -> bool:
        """First use of an account binds the device key it offers; later Hellos must match."""
        known = self._keys.get(member_id)
        if known is not None:  # bound keys never change: no database read on reconnects
            return offered is None or offered == bytes(known)
        account = await self.store.get_member(member_id)
        if account is None:
            return False
        if account.signature_key is None:
            if offered is None:
                return False
            await self.store.set_signature_key(member_id, offered)
            self._keys[member_id] = VerifyKey(offered)
            return True
        self._keys[member_id] = VerifyKey(account.signature_key)
        return offered is None or offered == account.signature_key

    def clock_skew_ms(self, hlc: int) -> int:
        return skew_ms(hlc, int(self.clock() * 1000)) if hlc else 0

    def deliver(self, member_ids: frozenset[int] | set[int], frame: bytes) -> None:
        """Fan-out of a room worker here: this node's sessions, and the other nodes'."""
        self.deliver_local(member_ids, frame)
        if self.cluster is not None:
            self.cluster.broadcast(member_ids, frame)

    def deliver_local(self, member_ids: frozenset[int] | set[int], frame: bytes) -> None:
        for member_id in member_ids:
            for session in list(self.by_member.get(member_id, ())):
                session.send(frame)

    def deliver_once(self, member_id: int, frame: bytes) -> bool:
        delivered = False
        for session in list(self.by_member.get(member_id, ())):
            delivered = session.send(frame) or delivered
        if self.cluster is not None:
            self.cluster.broadcast({member_id}, frame)
            return True
        return delivered

    def session_of(self, session_id: int) -> Asker | None:
        return self.sessions.get(session_id)

    # --- rooms -------------------------------------------------------------------------------

    async def room(self, room_id: bytes) -> RoomWorker | None:
        """The room's worker on this node (in a cluster: None also when another node owns it)."""
        target = await self.route(room_id)
        return target if isinstance(target, RoomWorker) else None

    @property
    def opening(self) -> int:
        """Rooms being opened now (a lock each while anyone waits on it)."""
        return len(self._opening)

    async def room_view(self, room_id: bytes) -> RoomSequencer | None:
        """The room's roster and bans, for reads: the worker's own, or (a room another node
        owns) as stored."""
        target = await self.route(room_id)
        return None if target is None else await self._view(room_id, target)

    async def _view(self, room_id: bytes, target: RoomWorker | str) -> RoomSequencer | None:
        """A room's roster and log position for a read: its worker's, or as stored (another
        node owns it, or its worker here lost the lease and may be ahead of the log)."""
        if isinstance(target, RoomWorker) and not target.lost:
            return target.sequencer
        state = await self.store.load_room(room_id)
        return None if state is None else RoomSequencer(state)

    async def route(self, room_id: bytes, *, wait: bool = True) -> RoomWorker | str | None:
        """Where the room's frames go: its worker here, the node that owns it, or None (no
        such room). ``wait``: a suspect's lease is waited out (see ClusterNode.live_holder);
        not for frames other nodes forwarded, which the bus hands over one at a time."""
        worker = self.rooms.get(room_id)
        if worker is not None:
            return worker
        cluster = self.cluster
        if cluster is not None:
            owner = cluster.routes.owner(room_id, self.monotonic())
            if owner is not None:
                return owner
        opening = self._opening.get(room_id)
        if opening is None:
            opening = self._opening[room_id] = (asyncio.Lock(), [0])
        lock, users = opening
        users[0] += 1
        try:
            async with lock:
                return await self._open(room_id, wait)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._opening[room_id]

    async def _open(self, room_id: bytes, wait: bool) -> RoomWorker | str | None:
        """Under the room's lock: its worker, made here if the room is ours to sequence."""
        cluster = self.cluster
        worker = self.rooms.get(room_id)
        if worker is not None:
            return worker
        fence: int | None = None
        if cluster is not None:
            if wait:
                holder = await cluster.live_holder(room_id)
            else:
                holder = await cluster.lease_holder(room_id)
            if holder is not None:
                return holder
            if await self.store.load_room(room_id) is None:
                return None  # no lease for rooms that do not exist
            taken = await cluster.acquire(room_id)
            if isinstance(taken, str):
                return taken
            fence = taken
        # Loaded after the lease is ours: everything the former owner stored is in it.
        state = await self.store.load_room(room_id)
        if state is None:
            return None
        worker = RoomWorker(
            room_id,
            RoomSequencer(state),
            self.store,
            self,
            self.server_key,
            batch_max=self.config.limits.batch_max,
            clock=self.clock,
            fence=fence,
            on_lost=self._worker_lost,
            on_moved=self._worker_moved,
        )
        await worker.learn_server_sender()
        await worker.learn_recent_requests()
        worker.start()
        self.rooms[room_id] = worker
        if fence is not None:
            log.info("room %s: lease taken (token %d)", room_id.hex(), fence)
        return worker

    def room_lost(self, room_id: bytes) -> None:
        """The room's lease is gone: its worker stops taking frames at once."""
        worker = self.rooms.get(room_id)
        if worker is not None:
            worker.lose()  # calls _worker_lost

    def _worker_lost(self, worker: RoomWorker) -> None:
        # It stays the room's way in until its batch under way is done (see _worker_moved).
        if self.cluster is not None:
            self.cluster.dropped(worker.room_id)

    def _worker_moved(self, worker: RoomWorker, moved: list[Moved]) -> None:
        """A lost worker's frames it did not answer, in arrival order: routed again, to the
        room's new owner, ahead of the same members' later frames (ClusterNode.again)."""
        if self.rooms.get(worker.room_id) is worker:
            del self.rooms[worker.room_id]
        for item in moved:
            asker = cast(Asker, item.requester)
            if self.cluster is None:
                _reject(asker, item.frame, ErrorCode.STORAGE_ERROR, MOVED)
            else:
                self.cluster.again(asker, item.frame)

    def held_rooms(self) -> list[bytes]:
        """The rooms sequenced here that could be handed over."""
        return [r for r, w in self.rooms.items() if not w.lost and r not in self._moving]

    async def adopt(self, room_id: bytes) -> None:
        """Open a room whose lease was handed to this node, if it is still ours."""
        assert self.cluster is not None
        if room_id not in self.rooms and room_id not in self._moving:
            self.cluster.routes.forget_owner(room_id)  # it may name the giver still
            await self.route(room_id, wait=False)

    async def hand_over(self, room_id: bytes, to: str) -> bool:
        """Give the room to node ``to``. Its frames wait here meanwhile, in order; the worker
        sequences and answers what it has; then the lease becomes ``to``'s (a new token, so
        nothing of ours could be written after) and the waiting frames are routed there, in
        order, before any later one. Whether the room moved."""
        cluster = self.cluster
        worker = self.rooms.get(room_id)
        if cluster is None or worker is None or worker.lost or room_id in self._moving:
            return False
        waiting = self._moving[room_id] = deque()
        given: bool | None = False
        try:
            if await worker.drain():
                assert worker.fence is not None
                given = await cluster.hand_over(room_id, worker.fence, to)
            if given is False:
                worker.resume()  # ``to`` is gone (or the lease was lost: renewal tells)
            else:
                worker.lose()  # nothing waits in it: nobody is refused
        finally:
            try:
                # Whatever arrives while these are routed queues behind them.
                while waiting:
                    session, frame, hops, attempts = waiting.popleft()
                    try:
                        await self._room_frame(session, frame, hops, attempts)
                    except StoreError:  # not sequenced: its sender may send it again
                        session.reject(frame, ErrorCode.STORAGE_ERROR, NO_ANSWER)
            finally:
                del self._moving[room_id]
        return bool(given)

    async def dispatch(self, session: ServerSession, frame: Frame) -> None:
        if frame.header.opcode == Opcode.KEY_PACKAGE:
            await self._key_package(session, frame)
            return
        if self.cluster is not None and self.cluster.follow(session, frame):
            return  # behind the member's unanswered frames for the room (see Routes)
        await self.room_frame(session, frame, 0, 0)

    async def forwarded(self, message: Forward) -> None:
        """A room frame another node's session sent, forwarded here (we owned the room)."""
        assert self.cluster is not None
        asker = RemoteSession(
            self.cluster.bus,
            message.origin,
            message.session_id,
            message.member_id,
            message.hops,
            message.forward_id,
            message.after,
        )
        try:
            frame = Frame.decode(message.frame)
        except ValueError:
            log.warning("cluster: undecodable forwarded frame from %s", message.origin)
            return
        if not self.cluster.take(message):
            return  # after a frame the bus lost: its origin routes both again, in order
        if self.cluster.follow(asker, frame):
            return  # behind the member's frames a lost worker here handed back
        room_id = frame.header.room_id_bytes
        if room_id not in self.rooms and room_id not in self._moving:
            # Sent here as to the room's owner: what we knew of its owner (perhaps this node,
            # before it handed the room over here) is older; the lease table tells.
            self.cluster.routes.forget_owner(room_id)
        await self.room_frame(asker, frame, message.hops, 0)

    async def room_frame(self, session: Asker, frame: Frame, hops: int, attempts: int) -> None:
        """A room frame from a session here or (``hops`` > 0) on another node; ``attempts``:
        forwards of it already given up (its owner did not answer)."""
        h = frame.header
        opcode = h.opcode
        room_id = h.room_id_bytes
        if h.room_id == 0:
            _reject(session, frame, ErrorCode.ROOM_NOT_FOUND, "room_id is zero")
            return
        if opcode not in ROOM_OPCODES and opcode not in (Opcode.SYNC_REQUEST, Opcode.GROUP_INFO):
            _reject(session, frame, ErrorCode.FRAME_REJECTED, f"unexpected {h.opcode_name} frame")
            return
        waiting = self._moving.get(room_id)
        if waiting is not None:
            waiting.append((session, frame, hops, attempts))  # the room is being handed over
            return
        await self._room_frame(session, frame, hops, attempts)

    async def _room_frame(self, session: Asker, frame: Frame, hops: int, attempts: int) -> None:
        h = frame.header
        opcode = h.opcode
        room_id = h.room_id_bytes
        target = await self.route(room_id, wait=hops == 0)
        if isinstance(target, str):
            assert self.cluster is not None
            if hops >= MAX_HOPS:
                _reject(session, frame, ErrorCode.STORAGE_ERROR, MOVED)
            else:
                self.cluster.forward(session, frame, target, hops + 1, attempts)
            return
        if opcode == Opcode.SYNC_REQUEST:
            await self._sync(
                session, frame, None if target is None else await self._view(room_id, target)
            )
            return
        if target is None:
            if opcode == Opcode.GROUP_INFO:
                await self._create_room(session, frame)
            else:
                _reject(
                    session,
                    frame,
                    ErrorCode.ROOM_NOT_FOUND,
                    f"room not found: {h.room_id:032x}",
                )
            return
        target.submit(frame, session)

    async def _create_room(self, session: Asker, frame: Frame) -> None:
        """A GroupInfo for an unknown room id creates the room, its sender as owner."""
        h = frame.header
        try:
            payload = decode_payload(Opcode.GROUP_INFO, frame.payload)
            if not isinstance(payload, GroupInfoData):
                raise PayloadDecodeError("room creation needs a GroupInfoData payload")
            summary = inspect_group_info(payload.group_info)
            handshake = Handshake(payload.handshake or "public")
        except (PayloadDecodeError, InvalidMlsMessage, ValueError) as exc:
            session.reject(frame, ErrorCode.INVALID_PAYLOAD, str(exc))
            return
        creator_key = await self.signature_key(session.member_id)
        members = summary.members
        if (
            len(members) != 1
            or members[0].member_id != session.member_id
            or creator_key is None
            or members[0].signature_key != bytes(creator_key)
        ):
            session.reject(
                frame, ErrorCode.INVALID_COMMIT, "a new room's group must hold just its creator"
            )
            return
        if summary.epoch != h.epoch:
            session.reject(frame, ErrorCode.INVALID_EPOCH, "frame epoch is not the group's")
            return
        room = Room(
            room_id=h.room_id_bytes,
            epoch=summary.epoch,
            next_log_index=0,
            creator=session.member_id,
            created_at=int(self.clock() * 1000),
            handshake=handshake,
            group_id=summary.group_id,
            name=payload.name or "",
            topic=payload.topic or "",
        )
        owner = RoomMember(session.member_id, Role.OWNER, members[0].leaf_index)
        try:
            await self.store.create_room(room, owner)
        except AlreadyExists:
            session.reject(frame, ErrorCode.ALREADY_EXISTS, "room id already taken")
            return
        await self.store.put_group_info(room.room_id, summary.epoch, payload.group_info)
        log.info("room %s created by %d", room.room_id.hex(), session.member_id)
        session.send(replies.answer(h, Opcode.GROUP_INFO, epoch=summary.epoch))

    async def _sync(self, session: Asker, frame: Frame, seq: RoomSequencer | None) -> None:
        h = frame.header
        if _SYNC_LAG:
            await asyncio.sleep(_SYNC_LAG)
        try:
            request = decode_payload(Opcode.SYNC_REQUEST, frame.payload)
        except PayloadDecodeError as exc:
            session.reject(frame, ErrorCode.INVALID_PAYLOAD, str(exc))
            return
        assert isinstance(request, SyncRequest)
        if seq is None:
            session.reject(frame, ErrorCode.ROOM_NOT_FOUND, f"room not found: {h.room_id:032x}")
            return
        # A kicked or banned member (REMOVED, its leaf maybe still in the tree) reads nothing
        # from the moment its Kick/Ban was sequenced; nor does a member a commit removed.
        if not seq.is_member(session.member_id) or seq.is_banned(
            session.member_id, int(self.clock() * 1000)
        ):
            session.reject(frame, ErrorCode.NOT_AUTHORIZED, "not a member of this room")
            return
        # The answer stops at what was sequenced when access was checked: a kick sequenced
        # while this read waits on the database must not let what follows it through.
        next_index, epoch_now = seq.next_log_index, seq.epoch
        limit = max(0, min(request.limit, self.config.limits.sync_max))
        if request.from_epoch is not None:
            # A joiner looks up the commit that added it: its Welcome has done its job (and
            # older ones of this room too; newer ones, re-adds after a removal, are kept).
            for welcome in await self.store.pending_welcomes(session.member_id):
                if (
                    welcome.room_id == h.room_id_bytes
                    and Frame.decode(welcome.frame).header.epoch <= request.from_epoch + 1
                ):
                    await self.store.welcome_delivered(welcome.welcome_id)
            to_epoch = epoch_now if request.to_epoch is None else min(request.to_epoch, epoch_now)
            stored = await self.store.commits_between(
                h.room_id_bytes, request.from_epoch, min(to_epoch, request.from_epoch + limit)
            )
            has_more = bool(stored) and stored[-1].epoch + 1 < to_epoch
        else:
            stored = await self.store.load_frames(h.room_id_bytes, request.from_log_index, limit)
            stored = [f for f in stored if f.log_index < next_index]
            last = stored[-1].log_index if stored else request.from_log_index - 1
            has_more = last + 1 < next_index
        response = SyncResponse(
            frames=[f.encode() for f in stored], has_more=has_more, server_epoch=epoch_now
        )
        session.send(replies.answer(h, Opcode.SYNC_RESPONSE, response, epoch=epoch_now))

    async def _key_package(self, session: ServerSession, frame: Frame) -> None:
        """Publish (payload: KeyPackages) or fetch (empty payload, context_id = member)."""
        h = frame.header
        if not frame.payload:
            # Per requester (all its sessions): one member cannot drain everyone's packages.
            limits = self.config.limits
            now = self.monotonic()
            bucket = self._kp_fetches.get(session.member_id)
            if bucket is None:
                bucket = self._kp_fetches[session.member_id] = TokenBucket(
                    limits.key_package_fetch_per_second, limits.key_package_fetch_burst, now
                )
            wait = bucket.take(now)
            if wait > 0:
                session.reject(
                    frame,
                    ErrorCode.RATE_LIMITED,
                    "too many KeyPackage fetches",
                    retry_after=TokenBucket.retry_after_seconds(wait),
                )
                return
            kp = await self.store.take_key_package(h.context_id)
            if kp is None:
                session.reject(frame, ErrorCode.MEMBER_NOT_FOUND, "no KeyPackage for this member")
                return
            session.send(
                replies.reply(
                    Opcode.KEY_PACKAGE,
                    RawPayload(kp),
                    request_id=h.request_id,
                    context_id=h.context_id,
                )
            )
            return
        try:
            payload = decode_payload(Opcode.KEY_PACKAGE, frame.payload)
            data = (
                payload.key_package_bytes if isinstance(payload, KeyPackageData) else frame.payload
            )
            kp_obj = None
            for suite in (1, 3):
                try:
                    kp_obj = parse_key_package(data, crypto_for_suite(suite))
                    break
                except InvalidMlsMessage:
                    continue
            if kp_obj is None:
                raise InvalidMlsMessage("not a valid KeyPackage for a supported cipher suite")
            owner = key_package_member_id(kp_obj)
        except (PayloadDecodeError, InvalidMlsMessage) as exc:
            session.reject(frame, ErrorCode.INVALID_PAYLOAD, str(exc))
            return
        key = await self.signature_key(session.member_id)
        leaf = kp_obj.leaf_node
        if (
            owner != session.member_id
            or key is None
            or leaf is None
            or leaf.signature_key != bytes(key)
        ):
            session.reject(frame, ErrorCode.NOT_AUTHORIZED, "KeyPackage is not this member's")
            return
        if is_last_resort(kp_obj):  # kept apart, replacing the older one, never consumed
            await self.store.set_last_resort_key_package(session.member_id, data)
            count = await self.store.key_package_count(session.member_id)
        else:
            count = await self.store.publish_key_packages(session.member_id, [data])
        session.send(
            replies.reply(Opcode.KEY_PACKAGE, b"", request_id=h.request_id, context_id=count)
        )


def _reject(session: Asker, frame: Frame, code: ErrorCode, message: str) -> None:
    h = frame.header
    session.send(replies.error(code, message, request_id=h.request_id, room_id=h.room_id))
