"""What the sans-IO client core asks its driver to do, and tells its application."""

from __future__ import annotations

from dataclasses import dataclass

from ..media.blob import MediaRef
from ..proto import Frame
from .content import Content


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send this frame to the server."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Message:
    room_id: bytes
    sender_id: int
    log_index: int
    timestamp_ms: int
    content: Content


@dataclass(frozen=True, slots=True)
class Acked:
    """A frame of ours was sequenced at ``log_index`` (None for frames that are not logged)."""

    request_id: int
    room_id: bytes
    log_index: int | None


@dataclass(frozen=True, slots=True)
class Failed:
    """A request of ours failed for good (after transparent retries, where those apply)."""

    request_id: int
    room_id: bytes
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The server answered a directory or room-creation request (driver futures)."""

    request_id: int
    frame: Frame


@dataclass(frozen=True, slots=True)
class EpochChanged:
    room_id: bytes
    epoch: int
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    # The commit's log index and the group as it stood right after it (the application may
    # see this event after later frames of the same batch moved the group on).
    log_index: int = -1
    tree_hash: bytes = b""
    members: tuple[int, ...] = ()
    cipher_suite: int = 0


@dataclass(frozen=True, slots=True)
class Joined:
    room_id: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class Left:
    room_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Moderated:
    room_id: bytes
    log_index: int
    action: str  # "kick", "ban", "unban", "redact"
    moderator_id: int
    target: int  # member id, or the redacted log index
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """A logged frame we could not read (reported, never silently dropped)."""

    room_id: bytes
    log_index: int
    sender_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Reacted:
    """A logged AppReaction: ``key`` added to (or, ``add`` false, taken off) the message at
    ``target``."""

    room_id: bytes
    sender_id: int
    log_index: int
    target: int
    key: str
    add: bool


@dataclass(frozen=True, slots=True)
class Receipted:
    """A logged AppReceipt: the sender has read (kind "Read") or received ("Delivered") the
    room up to the message at ``target``."""

    room_id: bytes
    sender_id: int
    log_index: int
    target: int
    kind: str
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Typing:
    """An ephemeral Typing frame (never logged): the sender is typing, for ``timeout_ms`` at
    most, or stopped."""

    room_id: bytes
    sender_id: int
    typing: bool
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class RoomMetaChanged:
    """A logged room metadata change (room_meta.py), applied: ``name``/``topic``/``avatar``
    are the room's values after it; ``changed`` names the fields this entry set."""

    room_id: bytes
    sender_id: int
    log_index: int
    timestamp_ms: int
    name: str
    topic: str
    changed: tuple[str, ...]
    avatar: MediaRef | None = None  # (None: the room has no avatar)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The driver lost its connection (``attempt`` 0) or a reconnect attempt failed
    (``attempt`` 1, 2, ...). ``retry_in``: seconds until the next attempt (None: the client
    does not reconnect by itself)."""

    reason: str
    attempt: int = 0
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The driver is connected again after a loss; every room is being caught up from its
    last applied log index, and the outbox resent."""

    attempts: int


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """The room has applied the log as far as the server had it, for the first time since the
    connection (each room once per connection)."""

    room_id: bytes


@dataclass(frozen=True, slots=True)
class StateChanged:
    """Persist this room (or, with room_id None, the identity and key packages)."""

    room_id: bytes | None


Event = (
    Outgoing
    | Message
    | Acked
    | Failed
    | Reply
    | EpochChanged
    | Joined
    | Left
    | Moderated
    | Undecryptable
    | Reacted
    | Receipted
    | Typing
    | RoomMetaChanged
    | Disconnected
    | Reconnected
    | CaughtUp
    | StateChanged
)
