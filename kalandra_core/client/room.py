"""One room as a client sees it: its MLS group, its sender keys and its place in the log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..crypto import SenderKeyStore
from ..media.blob import MediaRef
from ..mls.group import MlsGroup
from ..mls.update_tracker import UpdatePolicy, UpdateTracker
from ..proto import Frame

_VERSION = 1
# Outbox kinds that are not commits.
NOT_COMMITS = frozenset({"message", "moderation", "leave", "welcome"})


@dataclass(slots=True)
class Pending:
    """A request of ours that the server has not sequenced yet (the outbox)."""

    request_id: int
    room_id: bytes
    kind: str  # "message", "add", "remove", "update", "proposals", "moderation", "leave",
    # "welcome" (a Welcome of our logged commit, until the server has it in its mailbox)
    attempts: int = 1
    plaintext: bytes | None = None  # messages: re-encrypted at the new epoch on StaleEpoch
    key_packages: list[bytes] = field(default_factory=list)  # "add": rebuilt on a new epoch
    member_ids: list[int] = field(default_factory=list)  # "remove"
    welcomes: dict[int, bytes] = field(default_factory=dict)  # sent once the commit is logged
    awaiting_sync: bool = False  # resend after the next catch-up, unless the log shows it
    stale: bool = False  # the server said StaleEpoch: the resend counts as an attempt
    # The epoch of the frame last built for it (-1: unknown). A StaleEpoch reply naming a
    # current epoch not above it answers an older transmission, already superseded.
    epoch: int = -1
    # The frame to transmit. Commits: resent as is while still valid, so a transmission the
    # server may already hold is never replaced by a different commit (persisted for commits
    # only: messages are encrypted again after a restart).
    frame: bytes | None = None
    # Commits: the group's pending state of this build (MlsGroup.pending_commit), persisted, so
    # a group state saved before the commit can still merge it when the log shows it.
    mls: list[Any] | None = None
    # Commits the log showed and we merged (-1: not yet): their log index. They stay in the
    # saved outbox until a saved room state includes them (ClientCore.merged).
    log_index: int = -1
    # This build (a commit, or a message's send mark) is not saved yet, so it must not go out
    # (write-ahead; not persisted).
    unsaved: bool = False
    # Pacing (not persisted): the size of the copy in flight on this connection (0: none), and
    # the clock time of the last transmission (None: never transmitted since it was queued).
    sent_size: int = 0
    sent_at: float | None = None

    def to_state(self) -> list[Any]:
        return [
            self.request_id,
            self.room_id,
            self.kind,
            self.attempts,
            self.plaintext,
            self.key_packages,
            self.member_ids,
            self.welcomes,
            self.epoch,
            self.frame if self.kind not in NOT_COMMITS else None,
            self.mls,
            self.log_index,
        ]

    @classmethod
    def from_state(cls, s: list[Any]) -> Pending:
        # (Fields 8-11 are absent in states saved by older versions.)
        pending = cls(s[0], s[1], s[2], s[3], s[4], list(s[5]), list(s[6]), dict(s[7]))
        if len(s) > 8:
            pending.epoch = s[8]
        if len(s) > 11:
            pending.frame, pending.mls, pending.log_index = s[9], s[10], s[11]
        return pending


class ClientRoom:
    def __init__(
        self,
        room_id: bytes,
        group: MlsGroup,
        *,
        last_seen: int = -1,
        policy: UpdatePolicy = UpdatePolicy.STANDARD,
        now: float = 0.0,
    ) -> None:
        self.room_id = room_id
        self.room_int = int.from_bytes(room_id, "big")
        self.group = group
        self.keys = SenderKeyStore(
            epoch=group.epoch,
            epoch_secret=group.sender_key_secret(),
            own_index=group.own_leaf_index,
            member_indices={m.leaf_index for m in group.members()},
        )
        self.last_seen = last_seen  # highest log index applied, in order
        self.ahead: dict[int, Frame] = {}  # frames that arrived before their predecessors
        self.syncing = False
        self.anchored = last_seen >= 0  # joiners first find the commit that added them
        self.anchor_request: int | None = None  # the request id of that lookup
        self.active = True
        self._roster: dict[int, tuple[int, bytes]] | None = None
        # Post-compromise security: when our leaf is due for a fresh key (update_tracker.py).
        self.updates = UpdateTracker(policy, now)
        # Name, topic and avatar as the members agree on them (room_meta.py; unset until known).
        self.name = ""
        self.topic = ""
        self.avatar: MediaRef | None = None

    @property
    def epoch(self) -> int:
        return self.group.epoch

    def left(self) -> bool:
        return not self.active

    def roster(self) -> dict[int, tuple[int, bytes]]:
        """member id -> (leaf index, Ed25519 key), cached per epoch."""
        if self._roster is None:
            self._roster = {
                m.member_id: (m.leaf_index, m.signature_key) for m in self.group.members()
            }
        return self._roster

    def member_at(self, leaf: int) -> int | None:
        for member_id, (index, _) in self.roster().items():
            if index == leaf:
                return member_id
        return None

    def epoch_moved(self) -> None:
        """Call after every commit processed or merged."""
        self._roster = None
        if self.group.active and self.group.epoch > self.keys.epoch:
            self.keys.rekey(
                epoch=self.group.epoch,
                epoch_secret=self.group.sender_key_secret(),
                member_indices={m.leaf_index for m in self.group.members()},
                own_index=self.group.own_leaf_index,
            )

    def to_bytes(self) -> bytes:
        """Secret material: seal it before it is stored."""
        return cbor2.dumps(
            {
                "v": _VERSION,
                "room_id": self.room_id,
                "group": self.group.to_bytes(),
                "keys": self.keys.to_bytes(),
                "last_seen": self.last_seen,
                "anchored": self.anchored,
                "active": self.active,
                "updates": [
                    self.updates.policy.messages,
                    self.updates.policy.seconds,
                    *self.updates.to_state(),
                ],
                "name": self.name,
                "topic": self.topic,
                "avatar": None if self.avatar is None else self.avatar.to_cbor(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientRoom:
        state = cbor2.loads(data)
        if not isinstance(state, dict) or state.get("v") != _VERSION:
            raise ValueError("not a client room state (or an unknown version)")
        room = cls.__new__(cls)
        room.room_id = state["room_id"]
        room.room_int = int.from_bytes(room.room_id, "big")
        room.group = MlsGroup.from_bytes(state["group"])
        room.keys = SenderKeyStore.from_bytes(state["keys"])
        room.last_seen = state["last_seen"]
        room.ahead = {}
        room.syncing = False
        room.anchored = state["anchored"]
        room.anchor_request = None
        room.active = state["active"]
        room._roster = None
        messages, seconds, *tracker = state["updates"]
        room.updates = UpdateTracker.from_state(UpdatePolicy(messages, seconds), tracker)
        room.name = str(state.get("name", ""))  # (absent in states saved before metadata)
        room.topic = str(state.get("topic", ""))
        avatar = state.get("avatar")
        room.avatar = MediaRef.from_cbor(avatar) if isinstance(avatar, dict) else None
        return room
