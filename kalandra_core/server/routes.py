"""Where a room's frames go in a cluster, sans-IO: which node owns which room (as last seen),
and which forwarded frames still wait for their answer.

``now`` is the node's monotonic clock; nothing here decides ownership (the database's leases
do). A known owner is trusted for ``owner_ttl`` seconds only, so a node that died is looked up
again soon. A forwarded frame with no answer by its deadline makes its owner a suspect (for a
lease term): the frame is routed again, and a node that finds a suspect holding a room's lease
waits for that lease to run out and takes the room (failover on demand) instead of forwarding
to a node that may be dead. The frame keeps its request id, so if the dead owner stored it the
new owner answers with the stored frame (its resend filter is learned from the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

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

    def is_suspect(self, node: str, now: float) -> bool:
        until = self._suspects.get(node)
        if until is not None and now >= until:
            del self._suspects[node]
            return False
        return until is not None

    # --- forwarded frames ---------------------------------------------------------------------

    def forwarded(
        self, session: S, member_id: int, frame: Frame, owner: str, attempts: int, now: float
    ) -> None:
        request_id = frame.header.request_id
        if request_id:  # a frame without a request id expects no answer to match
            key = (member_id, request_id)
            deadline = now + self.forward_timeout
            self._waiting[key] = Waiting(session, frame, owner, deadline, attempts)

    def answered(self, member_id: int, request_id: int) -> None:
        """An answer (Reply, or the sender's own frame in a Deliver) came back."""
        if request_id:
            self._waiting.pop((member_id, request_id), None)

    def overdue(self, now: float) -> list[Waiting[S]]:
        """Forwarded frames past their deadline, forgotten now; their owners become suspects
        and are forgotten as their rooms' owners."""
        late = [(key, w) for key, w in self._waiting.items() if w.deadline <= now]
        for key, waiting in late:
            del self._waiting[key]
            self.forget_owner(waiting.frame.header.room_id_bytes)
            self.suspect(waiting.owner, now)
            self._given_up[key] = (waiting.owner, now + self.suspect_for)
        for key in [k for k, (_, until) in self._given_up.items() if until <= now]:
            del self._given_up[key]
        return [w for _, w in late]

    def stale_answer(self, member_id: int, request_id: int, node: str, now: float) -> bool:
        """Whether an answer comes from a node this frame was given up on (and routed again):
        a former owner waking up (its refusal, or a late copy) must not answer for the new
        one."""
        given_up = self._given_up.get((member_id, request_id))
        return given_up is not None and given_up[0] == node and now < given_up[1]

    @property
    def waiting(self) -> int:
        return len(self._waiting)
