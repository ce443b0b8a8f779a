"""The cluster's bus: how the processes of one deployment reach each other.

Messages are bytes (encoded here, sans-IO); a :class:`ClusterBus` carries them to one named node
(``send``) or to every other node (``broadcast``), in the order each sender gave them. The
PostgreSQL implementation is ``pg_bus.PgBus``; :class:`MemoryBus` connects nodes of one
process (tests, and the simulation, which drives it on virtual time).

The messages:

* :class:`Forward`: a room frame a session gave to a node that does not own the room, for the
  owner to handle as if the session were its own (``origin`` and ``session_id`` say where the
  answers go; ``hops`` stops a frame chasing a room that keeps moving). ``forward_id`` names
  this forward (random, never 0); ``after`` the forward of the member's frame for the room sent
  just before to the same node and not answered yet (0: none), which the receiver must have
  taken, else it drops this one (see ``ClusterNode.take``).
* :class:`Reply`: an answer for one session (Ack, Error, SyncResponse, a resent frame), and
  which node gave it (an answer from a node the frame was since taken away from is dropped).
* :class:`Deliver`: a frame for every session of these members (fan-out of sequenced and
  ephemeral frames), broadcast.
* :class:`Probe` and :class:`Alive`: "are you there?" and its answer (``nonce`` pairs them),
  asked of a node before it is handed rooms (rebalance.py): the node list in the database
  says a node renewed its row lately, not that it still runs. A node of an earlier version
  cannot decode a Probe and leaves it unanswered, so it is handed no rooms either.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# (kind 1 was a Forward without ``after``: refused by this version, not misread)
_REPLY, _DELIVER, _FORWARD, _PROBE, _ALIVE = 2, 3, 4, 5, 6
_U64 = struct.Struct(">Q")
_FORWARD_FIELDS = struct.Struct(">QQBQQ")


@dataclass(frozen=True, slots=True)
class Forward:
    origin: str
    session_id: int
    member_id: int
    hops: int
    frame: bytes
    forward_id: int = 0
    after: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    node: str
    session_id: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    member_ids: tuple[int, ...]
    frame: bytes


@dataclass(frozen=True, slots=True)
class Probe:
    origin: str
    nonce: int


@dataclass(frozen=True, slots=True)
class Alive:
    node: str
    nonce: int


Message = Forward | Reply | Deliver | Probe | Alive


class BusDecodeError(ValueError):
    pass


def encode(message: Message) -> bytes:
    if isinstance(message, Forward):
        origin = message.origin.encode()
        return (
            struct.pack(">BH", _FORWARD, len(origin))
            + origin
            + _FORWARD_FIELDS.pack(
                message.session_id,
                message.member_id,
                message.hops,
                message.forward_id,
                message.after,
            )
            + message.frame
        )
    if isinstance(message, Reply):
        node = message.node.encode()
        return (
            struct.pack(">BH", _REPLY, len(node))
            + node
            + struct.pack(">Q", message.session_id)
            + message.frame
        )
    if isinstance(message, Probe | Alive):
        kind, name = (
            (_PROBE, message.origin) if isinstance(message, Probe) else (_ALIVE, message.node)
        )
        encoded = name.encode()
        return struct.pack(">BH", kind, len(encoded)) + encoded + _U64.pack(message.nonce)
    ids = message.member_ids
    return struct.pack(f">BI{len(ids)}Q", _DELIVER, len(ids), *ids) + message.frame


def decode(body: bytes) -> Message:
    try:
        kind = body[0]
        if kind == _FORWARD:
            (size,) = struct.unpack_from(">H", body, 1)
            origin = body[3 : 3 + size].decode()
            fields = _FORWARD_FIELDS.unpack_from(body, 3 + size)
            session_id, member_id, hops, forward_id, after = fields
            frame = body[3 + size + _FORWARD_FIELDS.size :]
            return Forward(origin, session_id, member_id, hops, frame, forward_id, after)
        if kind == _REPLY:
            (size,) = struct.unpack_from(">H", body, 1)
            node = body[3 : 3 + size].decode()
            (session_id,) = struct.unpack_from(">Q", body, 3 + size)
            return Reply(node, session_id, body[3 + size + 8 :])
        if kind in (_PROBE, _ALIVE):
            (size,) = struct.unpack_from(">H", body, 1)
            name = body[3 : 3 + size].decode()
            (nonce,) = _U64.unpack_from(body, 3 + size)
            return Probe(name, nonce) if kind == _PROBE else Alive(name, nonce)
        if kind == _DELIVER:
            (count,) = struct.unpack_from(">I", body, 1)
            ids = struct.unpack_from(f">{count}Q", body, 5)
            return Deliver(tuple(ids), body[5 + 8 * count :])
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise BusDecodeError(str(exc)) from exc
    raise BusDecodeError(f"unknown bus message kind {body[:1].hex()}")


Handler = Callable[[bytes], None]
GapHandler = Callable[[], None]


class ClusterBus(Protocol):
    """A node's link to the others. ``send`` and ``broadcast`` never block: they queue, and the
    bus delivers in order per sender. Received bodies go to the handler given to ``start``, one
    at a time, in arrival order; a node never receives its own broadcasts.

    ``on_gap`` is called when the node's listener is back after it may have missed messages
    (its connection was lost and opened again): what was sent to it meanwhile is gone, and
    nothing says what it was."""

    node: str

    async def start(self, handler: Handler, on_gap: GapHandler | None = None) -> None: ...

    def send(self, target: str, body: bytes) -> None: ...

    def broadcast(self, body: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryBus:
    """Nodes of one process on one :class:`MemoryNetwork` (direct calls, in order)."""

    def __init__(self, network: MemoryNetwork, node: str) -> None:
        self.node = node
        self._network = network

    async def start(self, handler: Handler, on_gap: GapHandler | None = None) -> None:
        self._network.handlers[self.node] = handler
        if on_gap is not None:
            self._network.gap_handlers[self.node] = on_gap

    def send(self, target: str, body: bytes) -> None:
        handler = self._network.handlers.get(target)
        if handler is not None and target not in self._network.down:
            self._network.post(lambda: handler(body))

    def broadcast(self, body: bytes) -> None:
        for node in list(self._network.handlers):
            if node != self.node:
                self.send(node, body)

    async def close(self) -> None:
        self._network.handlers.pop(self.node, None)
        self._network.gap_handlers.pop(self.node, None)


class MemoryNetwork:
    """What the nodes of a :class:`MemoryBus` share; ``down`` nodes receive nothing.
    ``post`` runs a delivery (the default: at once; a simulation queues it on its scheduler).
    ``gap`` tells a node its listener is back after losing messages (a simulated reset)."""

    def __init__(self, post: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.handlers: dict[str, Handler] = {}
        self.gap_handlers: dict[str, GapHandler] = {}
        self.down: set[str] = set()
        self.post: Callable[[Callable[[], None]], None] = post or (lambda deliver: deliver())

    def gap(self, node: str) -> None:
        on_gap = self.gap_handlers.get(node)
        if on_gap is not None:
            self.post(on_gap)
