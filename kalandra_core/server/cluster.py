"""A node of a cluster: the leases it holds, its renewals, and its end of the bus.

Thin asyncio around the store's leases (the truth about ownership), :class:`Routes` (what this
node believes about the others, sans-IO) and a :class:`~.bus.ClusterBus`. The hub decides
what to do with a frame (``Hub.route``); this class carries out the cluster's part: take a
lease, forward a frame to its room's owner, send answers back to another node's session,
broadcast fan-out, give up a room the moment its lease is lost, and (``rebalance``) hand rooms
over to processes that hold less than their share (see rebalance.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

from ..proto import ErrorCode, Frame, FrameHeader
from ..storage.base import Store, StoreError
from . import bus as msg
from . import rebalance, replies
from .config import ClusterConfig
from .routes import Routes

log = logging.getLogger("kalandra.server.cluster")

MAX_HOPS = 3  # a frame that keeps meeting a moved room is refused (retry) rather than chased
_TAKEN = 65_536  # forwards taken remembered (see ClusterNode.take)
_SWEEP = 0.25  # seconds between looks at forwarded frames past their deadline
_POLL = 0.2  # seconds between looks at a suspect's lease
_BRIDGE_KNOWN = 10  # renewal periods between reads of the bridge's record once it is known
NO_ANSWER = "the room's server did not answer; retry"
_PROBING = (msg.encode(msg.Probe("", 0))[:1], msg.encode(msg.Alive("", 0))[:1])  # their kinds


class Asker(Protocol):
    """A session waiting for an answer: local (ServerSession) or on another node."""

    member_id: int
    closed: bool

    def send(self, frame: bytes) -> bool: ...

    def reject(self, frame: Frame, code: ErrorCode, message: str, **kw: int | None) -> None: ...


class ClusterHub(rebalance.Rebalancing, Protocol):
    """What the node needs of its hub."""

    bridge_bot: tuple[int, str] | None
    bridge_here: bool

    def room_lost(self, room_id: bytes) -> None: ...

    async def forwarded(self, message: msg.Forward) -> None: ...

    async def room_frame(self, session: Asker, frame: Frame, hops: int, attempts: int) -> None: ...

    def deliver_local(self, member_ids: frozenset[int] | set[int], frame: bytes) -> None: ...

    def session_of(self, session_id: int) -> Asker | None: ...

    def bus_gap(self) -> None: ...


class RemoteSession:
    """The session on another node that sent a forwarded frame: answers go back over the bus
    to that node, for that session."""

    def __init__(
        self,
        bus: msg.ClusterBus,
        origin: str,
        session_id: int,
        member_id: int,
        hops: int = 1,
        forward_id: int = 0,
        after: int = 0,
    ) -> None:
        self._bus = bus
        self.origin = origin
        self.session_id = session_id
        self.member_id = member_id
        self.hops = hops  # of the forward that brought its frame here
        self.forward_id = forward_id  # of the forward that brought its frame (see Forward)
        self.after = after
        self.closed = False  # as far as this node knows

    def send(self, frame: bytes) -> bool:
        reply = msg.Reply(self._bus.node, self.session_id, frame)
        self._bus.send(self.origin, msg.encode(reply))
        return True

    def reject(self, frame: Frame, code: ErrorCode, message: str, **kw: int | None) -> None:
        h = frame.header
        self.send(replies.error(code, message, request_id=h.request_id, room_id=h.room_id, **kw))


class ClusterNode:
    def __init__(
        self,
        config: ClusterConfig,
        store: Store,
        bus: msg.ClusterBus,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.node = bus.node
        self.store = store
        self.bus = bus
        self.monotonic = monotonic
        self.held: dict[bytes, int] = {}  # room -> fencing token of the lease we hold
        self.routes: Routes[Asker] = Routes(
            self.node,
            owner_ttl=min(1.0, config.renew_seconds),
            forward_timeout=config.forward_timeout,
            suspect_for=config.lease_seconds + config.forward_timeout,
        )
        self._hub: ClusterHub | None = None
        self._incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.Task[None]] = set()
        # (member id, room) -> frames being routed again, in order, and new ones behind them
        # (each with its hops so far and its forwards given up)
        self._retrying: dict[tuple[int, bytes], deque[tuple[Asker, Frame, int, int]]] = {}
        # ids of the forwards taken here, oldest first (see _remember)
        self._taken: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self._renewed_at = monotonic()
        self._probes: dict[int, tuple[str, asyncio.Future[None]]] = {}  # nonce -> asked node

    async def start(self, hub: ClusterHub) -> None:
        self._hub = hub
        await self.bus.start(self._on_bus, hub.bus_gap)
        self._renewed_at = self.monotonic()
        self._tasks = [
            asyncio.create_task(self._receive(), name="cluster-receive"),
            asyncio.create_task(self._renew_loop(), name="cluster-renew"),
            asyncio.create_task(self._sweep_loop(), name="cluster-sweep"),
            asyncio.create_task(self._bridge_loop(), name="cluster-bridge"),
        ]
        if self.config.rebalance:
            loop = rebalance.rebalance_loop(self, hub, self.monotonic)
            self._tasks.append(asyncio.create_task(loop, name="cluster-rebalance"))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._retries]:
            task.cancel()
        for task in [*self._tasks, *self._retries]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for room_id, token in list(self.held.items()):
            # Others may take the rooms at once instead of waiting for the leases to run out.
            with contextlib.suppress(StoreError):
                await self.store.release_lease(room_id, self.node, token)
        self.held.clear()
        if self.config.rebalance:
            with contextlib.suppress(StoreError):
                await self.store.node_alive(self.node, 0.0)  # no more rooms for us
        await self.bus.close()

    # --- leases -------------------------------------------------------------------------------

    async def lease_holder(self, room_id: bytes) -> str | None:
        """Another node holding an unexpired lease on the room, else None."""
        holder = await self.store.lease_owner(room_id)
        if holder is not None and holder != self.node:
            self.routes.saw_owner(room_id, holder, self.monotonic())
            return holder
        return None

    async def live_holder(self, room_id: bytes) -> str | None:
        """Like :meth:`lease_holder`, but a suspect (a node whose forwards went unanswered)
        is asked whether it is there; if it does not answer, its lease is waited out, for at
        most a lease term and a renewal: then the room is free to take, or taken by another
        node, or the suspect renewed (it is alive) and is trusted again."""
        holder = await self.lease_holder(room_id)
        if holder is None or not self.routes.is_suspect(holder, self.monotonic()):
            return holder
        suspect = holder
        deadline = self.monotonic() + self.config.lease_seconds + self.config.renew_seconds
        # A forward to it went unanswered, but the bus may have lost the forward or its
        # answer: if it answers a probe it runs, and holds the lease: trusted again at once.
        if await self.answering({suspect}, rebalance.PROBE_WITHIN):
            self.routes.acquit(suspect)
            return suspect
        # Another node that took the room meanwhile is alive: followed at once.
        while holder == suspect and self.monotonic() < deadline:
            await asyncio.sleep(_POLL)
            holder = await self.lease_holder(room_id)
        return holder

    async def acquire(self, room_id: bytes) -> int | str:
        """The new fencing token, or the node that holds the lease."""
        grant = await self.store.acquire_lease(room_id, self.node, self.config.lease_seconds)
        if grant.token is None:
            self.routes.saw_owner(room_id, grant.owner, self.monotonic())
            return grant.owner
        self.held[room_id] = grant.token
        self.routes.forget_owner(room_id)
        return grant.token

    async def hand_over(self, room_id: bytes, token: int, to: str) -> bool | None:
        """Give our lease (``token``) to node ``to`` (alive), with a new token: whether it was
        given (None: unknown, the store failed; the lease is then left to run out)."""
        # Not renewed from now: a renewal racing the handover must not report it as lost.
        self.held.pop(room_id, None)
        try:
            given = await self.store.hand_over_lease(
                room_id, self.node, token, to, self.config.lease_seconds
            )
        except StoreError as exc:
            log.warning("cluster: handing room %s over failed: %s", room_id.hex(), exc)
            return None
        if given:
            self.routes.saw_owner(room_id, to, self.monotonic())
        else:
            self.held[room_id] = token  # still ours, or lost: the next renewal tells
        return given

    def dropped(self, room_id: bytes) -> None:
        self.held.pop(room_id, None)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.renew_seconds)
            await self.renew()

    async def _bridge_loop(self) -> None:
        # Its own task, so a slow read never holds up a renewal. Read again after the bridge
        # is known too, less often: a bridge may be replaced, or taken out of the cluster
        # (``kalandra admin forget-bridge``), and clients must stop being told of its bot.
        while True:
            known = await self.learn_bridge_bot()
            await asyncio.sleep(self.config.renew_seconds * (_BRIDGE_KNOWN if known else 1))

    async def learn_bridge_bot(self) -> bool:
        """Name the bridge embedded in another process (it may start after this one) to this
        process's clients, as that process does: clients and the bridge stay unchanged; as
        recorded now (replaced, or gone). Whether one is known now."""
        hub = self._hub
        assert hub is not None
        if hub.bridge_here:
            return True  # ours: this process records it
        try:
            found = await self.store.bridge_bot()
        except StoreError as exc:
            log.warning("cluster: reading the bridge's bot failed: %s", exc)
            return hub.bridge_bot is not None
        if not hub.bridge_here and found != hub.bridge_bot:  # (the bridge may have started)
            log.info("cluster: the bridge's bot is %s", "gone" if found is None else "known")
            hub.bridge_bot = found
        return hub.bridge_bot is not None

    async def renew(self) -> None:
        started = self.monotonic()
        held = dict(self.held)
        try:
            lost = await self.store.renew_leases(self.node, held, self.config.lease_seconds)
        except StoreError as exc:
            log.warning("cluster: lease renewal failed: %s", exc)
            if self.monotonic() - self._renewed_at >= self.config.lease_seconds:
                # Our leases may have run out (by the database's clock, which ran at least as
                # long as ours since the last renewal began): others may hold them now.
                lost = list(held)
            else:
                return
        else:
            self._renewed_at = started
        assert self._hub is not None
        for room_id in lost:
            if self.held.get(room_id) == held[room_id]:  # not taken again meanwhile
                log.warning("cluster: lease of room %s lost", room_id.hex())
                self.held.pop(room_id, None)
                self._hub.room_lost(room_id)

    # --- the bus ------------------------------------------------------------------------------

    def forward(self, asker: Asker, frame: Frame, owner: str, hops: int, attempts: int) -> None:
        """Send a room frame to the room's owner; answers come back to ``asker``."""
        member, room = asker.member_id, frame.header.room_id_bytes
        forward_id = secrets.randbits(64) or 1
        if isinstance(asker, RemoteSession):
            origin, session_id, after = asker.origin, asker.session_id, asker.after
            if after:
                sent_to, sent_as = self._taken.get(after, (None, 0))
                if sent_to == "":
                    after = 0  # its frame was answered here: sequenced (or refused) already
                elif sent_to == owner:
                    after = sent_as  # its frame went on there too
            if asker.forward_id:
                self._remember(asker.forward_id, (owner, forward_id))
        else:
            origin, session_id = self.node, getattr(asker, "session_id", 0)
            after = self.routes.after(member, room, owner) if frame.header.request_id else 0
            self.routes.forwarded(
                asker, member, frame, owner, attempts + 1, self.monotonic(), forward_id
            )
        body = msg.Forward(origin, session_id, member, hops, frame.encode(), forward_id, after)
        self.bus.send(owner, msg.encode(body))

    def take(self, message: msg.Forward) -> bool:
        """Whether to take a forwarded frame: not if the forward it comes after never came
        here (the bus lost it, as a NOTIFY is lost while a listener reconnects). It is dropped
        unanswered; its origin then routes both again, in order, as for any forward left
        unanswered (see Routes). Taking it would sequence it before the lost one."""
        if message.after and message.after not in self._taken:
            log.warning(
                "cluster: a frame forwarded for %s came without the one before it; dropped",
                message.origin,
            )
            return False
        if message.forward_id:
            self._remember(message.forward_id, ("", 0))
        return True

    def _remember(self, forward_id: int, sent: tuple[str, int]) -> None:
        """A forward taken here: handled here ("", 0), or sent on (to that node, as that id)."""
        self._taken[forward_id] = sent
        self._taken.move_to_end(forward_id)
        if len(self._taken) > _TAKEN:
            self._taken.popitem(last=False)

    def follow(self, session: Asker, frame: Frame) -> bool:
        """A new frame goes behind the member's earlier frames for its room that are being
        routed again here, or (a session here) still wait for an answer (True: it has), so the
        room sequences them in order even if it moved meanwhile (see Routes)."""
        key = (session.member_id, frame.header.room_id_bytes)
        queue = self._retrying.get(key)
        if queue is not None:
            queue.append((session, frame, _hops(session), 0))
            return True
        if isinstance(session, RemoteSession):
            return False  # its origin keeps it behind what it forwarded before
        behind = self.routes.waiting_on(*key)
        if behind is None:
            return False
        self.forward(session, frame, behind, 1, 0)
        return True

    async def answering(self, nodes: set[str], within: float) -> set[str]:
        """Those of ``nodes`` that answer a probe over the bus within ``within`` seconds:
        running, and reachable, now (a row in the node list says only that a node renewed
        it lately)."""
        loop = asyncio.get_running_loop()
        asked: dict[str, tuple[int, asyncio.Future[None]]] = {}
        for node in nodes:
            nonce = secrets.randbits(64) or 1
            answered = loop.create_future()
            self._probes[nonce] = (node, answered)
            asked[node] = (nonce, answered)
            self.bus.send(node, msg.encode(msg.Probe(self.node, nonce)))
        try:
            if asked:
                await asyncio.wait([f for _, f in asked.values()], timeout=within)
        finally:
            for nonce, answered in asked.values():
                self._probes.pop(nonce, None)
                answered.cancel()  # (no-op if answered)
        return {n for n, (_, f) in asked.items() if f.done() and not f.cancelled()}

    def _on_bus(self, body: bytes) -> None:
        # Probes are answered at once, not behind the queue: the answer says this node runs,
        # hears the bus and reaches the database, whatever its backlog.
        if body[:1] in _PROBING:
            try:
                message = msg.decode(body)
            except msg.BusDecodeError:
                log.warning("cluster: an undecodable probe on the bus")
                return
            if isinstance(message, msg.Probe):
                # Not while our renewals fail (cut off from the database): we could not
                # serve a room, and the leases we hold may be running out.
                if self.monotonic() - self._renewed_at < self.config.lease_seconds:
                    alive = msg.Alive(self.node, message.nonce)
                    self.bus.send(message.origin, msg.encode(alive))
            elif isinstance(message, msg.Alive):
                asked = self._probes.get(message.nonce)
                if asked is not None and asked[0] == message.node and not asked[1].done():
                    asked[1].set_result(None)
            return
        self._incoming.put_nowait(body)

    def broadcast(self, member_ids: frozenset[int] | set[int], frame: bytes) -> None:
        self.bus.broadcast(msg.encode(msg.Deliver(tuple(member_ids), frame)))

    async def _receive(self) -> None:
        # One at a time, in arrival order: the frames a session forwarded stay in its order.
        while True:
            body = await self._incoming.get()
            try:
                await self._handle(msg.decode(body))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster: a bus message failed")

    async def _handle(self, message: msg.Message) -> None:
        hub = self._hub
        assert hub is not None
        if isinstance(message, msg.Forward):
            await hub.forwarded(message)
        elif isinstance(message, msg.Reply):
            session = hub.session_of(message.session_id)
            if session is not None and len(message.frame) >= 128:
                request_id = FrameHeader.parse(message.frame[:128]).request_id
                member = session.member_id
                if self.routes.stale_answer(member, request_id, message.node, self.monotonic()):
                    return
                self.routes.answered(member, request_id)
                session.send(message.frame)
        elif isinstance(message, msg.Deliver):
            if self.routes.waiting:  # the sender's own frame is its answer (its ack)
                header = FrameHeader.parse(message.frame[:128])
                self.routes.answered(header.sender_id, header.request_id)
            hub.deliver_local(frozenset(message.member_ids), message.frame)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP)
            for waiting in self.routes.overdue(self.monotonic()):
                log.warning("cluster: node %s did not answer a forwarded frame", waiting.owner)
                # Never refused for want of an answer: the owner may have sequenced it (the
                # answer lost or late), and a refusal says it was not, so its sender would
                # drop a commit the room has. Routed again until answered (the owner answers
                # a request id it has with the stored frame) or its session is gone.
                if waiting.session.closed:
                    continue
                # Routed again, the same frame (same request id), one at a time per member
                # and room: see Routes.
                self._queue(waiting.session, waiting.frame).append(
                    (waiting.session, waiting.frame, 0, waiting.attempts)
                )

    def again(self, session: Asker, frame: Frame) -> None:
        """Route again a frame a worker here took but lost (its lease went before it answered):
        to the room's new owner, in order behind the member's frames for the room already
        being routed again, and ahead of its later ones (``follow``)."""
        self._queue(session, frame).append((session, frame, _hops(session), 0))

    def _queue(self, session: Asker, frame: Frame) -> deque[tuple[Asker, Frame, int, int]]:
        key = (session.member_id, frame.header.room_id_bytes)
        queue = self._retrying.get(key)
        if queue is None:
            queue = self._retrying[key] = deque()
            task = asyncio.create_task(self._again(key, queue))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
        return queue

    async def _again(
        self, key: tuple[int, bytes], queue: deque[tuple[Asker, Frame, int, int]]
    ) -> None:
        assert self._hub is not None
        try:
            while queue:
                session, frame, hops, attempts = queue[0]
                try:
                    await self._hub.room_frame(session, frame, hops, attempts)
                except StoreError:
                    session.reject(frame, ErrorCode.STORAGE_ERROR, NO_ANSWER)
                queue.popleft()
        finally:
            del self._retrying[key]


def _hops(session: Asker) -> int:
    """Forwards a frame of this session took to get here (0: its own session is here)."""
    return session.hops if isinstance(session, RemoteSession) else 0
