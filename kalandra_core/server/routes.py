"""Where a room's frames go in a cluster, sans-IO: which node owns which room (as last seen),
and which forwarded frames still wait for their answer.

``now`` is the node's monotonic clock; nothing here decides ownership (the database's leases
do). A known owner is trusted for ``owner_ttl`` seconds only, so a node that died is looked up
again soon. A forwarded frame with no answer by its deadline makes its owner a suspect (for a
lease term): the frame is routed again, and a node that finds a suspect holding a room's lease
asks it whether it is there (the bus may have lost a forward or its answer): if it answers it
is acquitted and the frame goes to it again; else the node waits for that lease to run out and
takes the room (failover on demand) instead of forwarding to a node that may be dead. The
frame keeps its request id, so if the dead owner stored it the new owner answers with the
stored frame (its resend filter is learned from the log).

A member's frames for a room keep their order across a failover: a new frame while earlier ones
still wait for an answer goes where they went (``waiting_on``), even if the room has moved
meanwhile, and when one of them is overdue all of them are routed again, in their order. Each
forward names the one it comes after (``after``): the latest of them sent to the same node and
not answered yet, so that node can tell one the bus lost and take nothing behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..proto import Frame

S = TypeVar("S")


@dataclass(slots=True)
class Waiting(Generic[S]):
    session: S
    frame: Frame
    owner: str
    deadline: float
    attempts: int  # forwards of this frame so far


class Routes(Generic[S]):
    def __init__(
        self, node: str, *, owner_ttl: float, forward_timeout: float, suspect_for: float
    ) -> None:
        self.node = node
        self.owner_ttl = owner_ttl
        self.forward_timeout = forward_timeout
        self.suspect_for = suspect_for
        self._owners: dict[bytes, tuple[str, float]] = {}  # room -> (node, trusted until)
        self._suspects: dict[str, float] = {}  # node -> suspected until
        # (member id, request id) -> the session waiting for the owner's answer
        self._waiting: dict[tuple[int, int], Waiting[S]] = {}
        # (member id, room) -> [the node its latest waiting frame went to, frames waiting,
        # the id of that latest forward]
        self._behind: dict[tuple[int, bytes], list[Any]] = {}
        # (member id, request id) -> (the owner given up on, until when its answers are dropped)
        self._given_up: dict[tuple[int, int], tuple[str, float]] = {}

    # --- owners -----------------------------------------------------------------------------

    def owner(self, room_id: bytes, now: float) -> str | None:
        """Another node known to own the room (None: unknown, or too old to trust)."""
        known = self._owners.get(room_id)
        if known is None:
            return None
        if now >= known[1]:
            del self._owners[room_id]
            return None
        return known[0]

    def saw_owner(self, room_id: bytes, node: str, now: float) -> None:
        if node != self.node:
            self._owners[room_id] = (node, now + self.owner_ttl)

    def forget_owner(self, room_id: bytes) -> None:
        self._owners.pop(room_id, None)

    def suspect(self, node: str, now: float) -> None:
        self._suspects[node] = now + self.suspect_for

    def acquit(self, node: str) -> None:
        """``node`` answered since it was suspected: trusted again, and its answers to the
        frames given up on it taken (they are routed to it again)."""
        self._suspects.pop(node, None)
        for key in [k for k, (owner, _) in self._given_up.items() if owner == node]:
            del self._given_up[key]

    def is_suspect(self, node: str, now: float) -> bool:
        until = self._suspects.get(node)
        if until is not None and now >= until:
            del self._suspects[node]
            return False
        return until is not None

    # --- forwarded frames ---------------------------------------------------------------------

    def forwarded(
        self,
        session: S,
        member_id: int,
        frame: Frame,
        owner: str,
        attempts: int,
        now: float,
        forward_id: int = 0,
    ) -> None:
        request_id = frame.header.request_id
        if request_id:  # a frame without a request id expects no answer to match
            key = (member_id, request_id)
            deadline = now + self.forward_timeout
            if key in self._waiting:
                self._drop(key)
            given_up = self._given_up.get(key)
            if given_up is not None and given_up[0] == owner:
                del self._given_up[key]  # asked again: its answer is the one awaited now
            self._waiting[key] = Waiting(session, frame, owner, deadline, attempts)
            behind = self._behind.setdefault(
                (member_id, frame.header.room_id_bytes), [owner, 0, 0]
            )
            behind[0] = owner
            behind[1] += 1
            behind[2] = forward_id

    def after(self, member_id: int, room_id: bytes, owner: str) -> int:
        """The id of the forward of the member's latest frame for the room, if it went to
        ``owner`` and frames of it still wait for an answer (0: none): a frame forwarded there
        now must not be taken unless that forward was."""
        behind = self._behind.get((member_id, room_id))
        return int(behind[2]) if behind is not None and behind[0] == owner else 0

    def waiting_on(self, member_id: int, room_id: bytes) -> str | None:
        """The node the member's latest frame for the room went to, while frames of it wait
        there for an answer (None: none wait)."""
        behind = self._behind.get((member_id, room_id))
        return None if behind is None else str(behind[0])

    def answered(self, member_id: int, request_id: int) -> None:
        """An answer (Reply, or the sender's own frame in a Deliver) came back."""
        if request_id:
            self._drop((member_id, request_id))

    def _drop(self, key: tuple[int, int]) -> Waiting[S] | None:
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            room = (key[0], waiting.frame.header.room_id_bytes)
            behind = self._behind[room]
            behind[1] -= 1
            if behind[1] == 0:
                del self._behind[room]
        return waiting

    def overdue(self, now: float) -> list[Waiting[S]]:
        """Forwarded frames past their deadline, and every frame waiting behind them (the same
        member's, for the same room), in the order they were forwarded; forgotten now. The
        owners of late frames become suspects and are forgotten as their rooms' owners."""
        late = {
            (key[0], w.frame.header.room_id_bytes)
            for key, w in self._waiting.items()
            if w.deadline <= now
        }
        for key in [k for k, (_, until) in self._given_up.items() if until <= now]:
            del self._given_up[key]
        if not late:
            return []
        out = [
            (key, w)
            for key, w in self._waiting.items()
            if (key[0], w.frame.header.room_id_bytes) in late
        ]
        for key, waiting in out:
            self._drop(key)
            if waiting.deadline <= now:
                self.forget_owner(waiting.frame.header.room_id_bytes)
                self.suspect(waiting.owner, now)
            self._given_up[key] = (waiting.owner, now + self.suspect_for)
        return [w for _, w in out]

    def stale_answer(self, member_id: int, request_id: int, node: str, now: float) -> bool:
        """Whether an answer comes from a node this frame was given up on (and routed again):
        a former owner waking up (its refusal, or a late copy) must not answer for the new
        one."""
        given_up = self._given_up.get((member_id, request_id))
        return given_up is not None and given_up[0] == node and now < given_up[1]

    @property
    def waiting(self) -> int:
        return len(self._waiting)
