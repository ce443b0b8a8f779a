"""An in-memory network between simulated clients and the real server, on virtual time.

Every connection has two ends that implement the transport contract's ``FrameSink``
(``kalandra_core/transport/interface.py``); the server end is handed to ``Hub.session_factory`` and
the client end to the client driver's session factory, exactly as TCP/QUIC do.

What "packet loss" means here. Kalandra runs over reliable streams (TCP, QUIC): a lost packet
is retransmitted, so loss does not drop frames, it delays them, and when the transport gives up
the connection dies. A frame sent with loss probability ``p`` is therefore:

* retransmitted while a draw stays below ``p`` (each retransmission adds the retransmission
  timeout, which doubles, like TCP's backoff); after ``max_retransmits`` the connection breaks;
* independently, with probability ``break_per_frame`` the connection breaks while this frame is
  on the wire (a reset, a NAT timeout, the radio going away).

A broken connection loses every frame still in flight in both directions, and both sessions
get ``connection_lost`` (each after its own short detection delay). Frames on the client->server
stream keep their order (one byte stream). Server->client frames keep their order on a TCP-like
connection; on a QUIC-like one each frame travels on its own stream (as our QUIC transport sends
them) and they overtake each other. The network also delivers some server->client frames twice
(``duplicate``), as a client may see a frame live and again in a sync.

Partitions: ``partition(name)`` cuts a client off: its connections go dark (frames are dropped;
both ends notice after a detection delay) and its connection attempts fail after
``connect_timeout`` until ``heal(name)``.

Several server nodes (a cluster): ``balancer`` picks the node a new connection reaches (a load
balancer in front of the processes: the client's home node while it is up, else another), and
each node has a :class:`NodeGate`. A paused node (SIGSTOP) runs nothing: frames and
``connection_lost`` for its sessions wait at the gate, and what it sends leaves when it resumes;
its connections stay up (a stopped process's sockets stay open). A crashed node (kill -9): its
connections break at once (the kernel resets them; the clients notice after the detection
delay), its sessions are never told, and nothing of it reaches the network again.

Every decision comes from one seeded ``random.Random`` and every delivery is a timer of the
virtual-time loop, so a seed determines the whole run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kalandra_core.client.driver import Connector, ServerAddress
from kalandra_core.proto import Frame, ProtocolError
from kalandra_core.transport.interface import FrameSink, Session, SessionFactory


@dataclass(frozen=True, slots=True)
class NetProfile:
    latency: tuple[float, float] = (0.005, 0.060)  # one-way delay range, seconds
    loss: float = 0.0  # per-frame packet loss probability (-> retransmissions)
    rto: float = 0.2  # first retransmission timeout; doubles per retransmission
    max_retransmits: int = 6  # one more loss and the transport gives up (connection breaks)
    break_per_frame: float = 0.0  # extra per-frame probability that the connection dies
    duplicate: float = 0.0  # server->client frames delivered a second time
    quic_share: float = 0.5  # connections whose server->client frames may be reordered
    connect_timeout: float = 3.0  # a connection attempt during a partition fails after this
    detect: tuple[float, float] = (0.05, 1.5)  # delay until an end notices a dead connection

    @classmethod
    def at_loss(cls, loss: float) -> NetProfile:
        """The simulation's standard profile for a packet-loss level."""
        return cls(loss=loss, break_per_frame=loss / 40, duplicate=0.03)


class Tracer(Protocol):
    def __call__(self, kind: str, *fields: object) -> None: ...


class PartitionedError(ConnectionRefusedError):
    pass


class NodeGate:
    """Whether a server node runs: ``up``, ``paused`` (what it does or receives waits, in order,
    until ``resume``) or ``crashed`` (nothing of it happens any more)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, node: str) -> None:
        self.node = node
        self.state = "up"
        self._deferred: list[Callable[[], object]] = []
        self._running = asyncio.Event()
        self._running.set()
        self._loop = loop

    @property
    def up(self) -> bool:
        return self.state == "up"

    def run(self, action: Callable[[], object]) -> None:
        if self.state == "up":
            action()
        elif self.state == "paused":
            self._deferred.append(action)

    async def wait(self) -> None:
        """Returns when the node runs (never, once it crashed)."""
        await self._running.wait()

    def pause(self) -> None:
        self.state = "paused"
        self._running.clear()

    def crash(self) -> None:
        self.state = "crashed"
        self._running.clear()
        self._deferred.clear()

    def resume(self) -> None:
        self.state = "up"
        self._running.set()
        deferred, self._deferred = self._deferred, []
        for action in deferred:
            self._loop.call_soon(action)


# client name -> (node, its session factory, its gate); None: no node is up
Balancer = Callable[[str], tuple[str, SessionFactory, NodeGate] | None]


@dataclass(slots=True)
class NetStats:
    frames: int = 0
    delivered: int = 0
    dropped: int = 0
    retransmissions: int = 0
    duplicates: int = 0
    breaks: int = 0
    connects: int = 0
    refused: int = 0


class _End:
    """One end of a connection: the sink its owner writes to; frames go to the peer's session."""

    def __init__(self, conn: SimConnection, side: str) -> None:
        self.conn = conn
        self.side = side  # "client" or "server"
        self.session: Session | None = None
        self.closing = False
        self.lost = False
        self.last_arrival = 0.0  # ordered stream: no frame overtakes the previous one
        self.in_flight = 0
        # The transport gave up on a frame: on an ordered stream nothing after it arrives
        # (a byte stream cannot skip it) until the connection breaks.
        self.stalled = False

    @property
    def peer(self) -> str:
        return f"sim:{self.conn.client}#{self.conn.cid}/{self.side}"

    @property
    def buffered(self) -> int:
        return self.in_flight

    @property
    def other(self) -> _End:
        return self.conn.server_end if self.side == "client" else self.conn.client_end

    def send(self, frame: bytes) -> bool:
        if self.closing or self.lost:
            return False
        gate = self.conn.gate
        if self.side == "server" and gate is not None and not gate.up:
            # A paused node's output leaves when it resumes.
            gate.run(lambda: self._send(frame))
            return True
        return self._send(frame)

    def _send(self, frame: bytes) -> bool:
        if self.closing or self.lost:
            return False
        if not self.conn.alive:
            # Dead but not noticed yet: like a socket, the send "succeeds" into the void.
            self.conn.net.stats.dropped += 1
            return True
        self.conn.net.transmit(self, frame)
        return True

    def close(self, reason: str = "") -> None:
        """Flush what is queued (its frames are already scheduled), then close both ends."""
        if self.closing:
            return
        self.closing = True
        net = self.conn.net
        at = max(net.loop.time(), self.last_arrival) + 0.001
        net.loop.call_at(at, self.conn.finish, reason or "closed", self.side)

    def connection_lost(self, reason: str) -> None:
        if self.lost:
            return
        gate = self.conn.gate
        if self.side == "server" and gate is not None and not gate.up:
            gate.run(lambda: self.connection_lost(reason))
            return
        self.lost = True
        if self.session is not None:
            self.session.connection_lost(reason)


class SimConnection:
    def __init__(
        self,
        net: SimNetwork,
        cid: int,
        client: str,
        ordered_down: bool,
        node: str = "",
        gate: NodeGate | None = None,
    ) -> None:
        self.net = net
        self.cid = cid
        self.client = client
        self.node = node  # the server node at the other end ("" with one server)
        self.gate = gate
        self.ordered_down = ordered_down  # TCP-like; False: QUIC-like server->client streams
        self.alive = True
        self.client_end = _End(self, "client")
        self.server_end = _End(self, "server")

    def finish(self, reason: str, closed_by: str) -> None:
        """Orderly close (after the closer's frames went out)."""
        if not self.alive:
            return
        self.alive = False
        self.net.trace("close", self.client, self.cid, closed_by)
        closer = self.client_end if closed_by == "client" else self.server_end
        closer.connection_lost(reason)
        closer.other.connection_lost("closed by peer")

    def break_(self, reason: str) -> None:
        """The transport died: frames in flight are gone; each end notices a bit later."""
        if not self.alive:
            return
        self.alive = False
        net = self.net
        net.stats.breaks += 1
        net.trace("break", self.client, self.cid, reason)
        # The server notices no later than the client, so a reconnecting client never finds its
        # old session still registered (two sessions of one member would make the fan-out order
        # depend on object ids, i.e. not reproducible).
        first, second = sorted(net.rng.uniform(*net.profile.detect) for _ in range(2))
        why = f"connection broken: {reason}"
        net.loop.call_later(first, self.server_end.connection_lost, why)
        net.loop.call_later(second, self.client_end.connection_lost, why)


@dataclass(slots=True)
class _ClientState:
    partitioned: bool = False
    connections: list[SimConnection] = field(default_factory=list)


class SimNetwork:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        profile: NetProfile,
        server: SessionFactory,
        trace: Tracer,
        balancer: Balancer | None = None,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.profile = profile
        self.server = server
        self.balancer = balancer
        self.trace = trace
        self.stats = NetStats()
        self._clients: dict[str, _ClientState] = {}
        self._cids = 0

    def _client(self, name: str) -> _ClientState:
        return self._clients.setdefault(name, _ClientState())

    # --- faults ------------------------------------------------------------------------------

    def partition(self, name: str) -> None:
        state = self._client(name)
        state.partitioned = True
        self.trace("partition", name)
        for conn in state.connections:
            conn.break_("partitioned")

    def heal(self, name: str) -> None:
        self._client(name).partitioned = False
        self.trace("heal", name)

    def is_partitioned(self, name: str) -> bool:
        return self._client(name).partitioned

    def break_connections(self, name: str, reason: str) -> None:
        for conn in self._client(name).connections:
            conn.break_(reason)

    def crash_node(self, node: str) -> None:
        """The node's process died: its connections are reset; its sessions hear nothing."""
        for state in self._clients.values():
            for conn in state.connections:
                if conn.node == node and conn.alive:
                    conn.server_end.lost = True
                    conn.break_("server crashed")

    def set_profile(self, profile: NetProfile) -> None:
        self.profile = profile

    # --- connecting --------------------------------------------------------------------------

    def connector(self) -> Connector:
        """The driver's ``connector`` hook (``Client(..., connector=...)``): the client drivers'
        addresses name the simulated client in ``host``."""

        async def connect(
            address: ServerAddress, factory: SessionFactory, _ca: bytes | None
        ) -> FrameSink:
            return await self.connect(address.host, factory)

        return connect

    async def connect(self, name: str, factory: SessionFactory) -> FrameSink:
        state = self._client(name)
        p = self.profile
        # Handshake: one round trip (plus retransmissions under loss).
        rtt = self.rng.uniform(*p.latency) + self.rng.uniform(*p.latency)
        while self.rng.random() < p.loss:
            rtt += p.rto
        await asyncio.sleep(rtt)
        target = ("", self.server, None) if self.balancer is None else self.balancer(name)
        if state.partitioned or target is None:
            self.stats.refused += 1
            self.trace("refused", name)
            await asyncio.sleep(p.connect_timeout)
            raise PartitionedError(f"{name}: network unreachable")
        node, server, gate = target
        self._cids += 1
        ordered_down = self.rng.random() >= p.quic_share
        conn = SimConnection(self, self._cids, name, ordered_down, node, gate)
        state.connections = [c for c in state.connections if c.alive] + [conn]
        self.stats.connects += 1
        kind = "tcp" if ordered_down else "quic"
        self.trace("connect", name, conn.cid, kind, *([node] if node else []))
        conn.server_end.session = server(conn.server_end)
        conn.client_end.session = factory(conn.client_end)
        return conn.client_end

    # --- moving frames -----------------------------------------------------------------------

    def transmit(self, sender: _End, frame: bytes) -> None:
        conn = sender.conn
        p = self.profile
        rng = self.rng
        now = self.loop.time()
        self.stats.frames += 1
        delay = rng.uniform(*p.latency)
        rto = p.rto
        tries = 0
        while rng.random() < p.loss:
            tries += 1
            self.stats.retransmissions += 1
            if tries > p.max_retransmits:
                self.loop.call_at(now + delay, conn.break_, "retransmission limit")
                sender.stalled = True
                return
            delay += rto
            rto *= 2
        if rng.random() < p.break_per_frame:
            self.loop.call_at(now + rng.uniform(0, delay), conn.break_, "reset")
        downstream = sender.side == "server"
        at = now + delay
        if not downstream or conn.ordered_down:
            if sender.stalled:
                if downstream:
                    rng.random()  # the duplicate draw below: a seed keeps its other decisions
                return
            at = max(at, sender.last_arrival + 1e-6)
            sender.last_arrival = at
        else:
            sender.last_arrival = max(sender.last_arrival, at)
        sender.in_flight += len(frame)
        self.loop.call_at(at, self._arrive, sender, frame, True)
        if downstream and rng.random() < p.duplicate:
            self.stats.duplicates += 1
            again = at + rng.uniform(0.0, 0.3)
            sender.last_arrival = max(sender.last_arrival, again)
            self.loop.call_at(again, self._arrive, sender, frame, False)

    def _arrive(self, sender: _End, data: bytes, first: bool) -> None:
        if first:
            sender.in_flight -= len(data)
        gate = sender.conn.gate
        if sender.side == "client" and gate is not None and not gate.up:
            gate.run(lambda: self._deliver(sender, data))  # a paused node reads it on resume
            return
        self._deliver(sender, data)

    def _deliver(self, sender: _End, data: bytes) -> None:
        receiver = sender.other
        if not sender.conn.alive or receiver.closing or receiver.lost:
            self.stats.dropped += 1
            return
        session = receiver.session
        assert session is not None
        self.stats.delivered += 1
        try:
            frame = Frame.decode(data)
        except ProtocolError as exc:
            session.protocol_error(exc)
            receiver.close("protocol error")
            return
        session.frame_received(frame)
