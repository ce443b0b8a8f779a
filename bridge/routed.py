"""What the bot routes to a portal's queue toward Matrix, in log order.

Besides the Kalandra events themselves, two points of the queue that are no log entries:
``RosterCheck`` (the group as the bot held it, made to match when the queue reaches it) and
``MatrixInvite`` (an invitation placed after the history the portal sends first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mautrix.types import UserID

from kalandra_core.client import events as ev
from kalandra_core.client.events import Message

if TYPE_CHECKING:
    from kalandra_core.client.room import ClientRoom


@dataclass(frozen=True, slots=True)
class RosterCheck:
    """The group as the bot held it at one point of the queue (start-up, a new portal): the
    portal's ghosts and epoch state are made to match it when the queue reaches it."""

    room_id: bytes
    epoch: int
    tree_hash: bytes
    members: tuple[int, ...]
    cipher_suite: int

    @classmethod
    def of(cls, room: ClientRoom) -> RosterCheck:
        group = room.group
        members = tuple(sorted(room.roster()))
        return cls(room.room_id, group.epoch, group.tree_hash, members, group.suite)


@dataclass(frozen=True, slots=True)
class MatrixInvite:
    """Invite a Matrix user who may enter (access.py) at this point of the queue: after the
    history the portal sends first, which the newcomer then does not read."""

    room_id: bytes
    mxid: UserID
    log_index: int = -1  # (no entry of the log)


# RosterCheck: a point of the queue, no entry; Typing: ephemeral, never logged.
Item = (
    Message
    | ev.EpochChanged
    | ev.Moderated
    | ev.Left
    | ev.Undecryptable
    | ev.Reacted
    | ev.Receipted
    | ev.Typing
    | ev.RoomMetaChanged
    | RosterCheck
    | MatrixInvite
)
