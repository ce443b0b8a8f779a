"""What the bridge's components keep in memory while the bridge runs: one of each per bridge
process, on its context (app.py makes them), so that nothing of it is process-wide and a
component can be built twice in one process, or alone in a test."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mautrix.types import EncryptedEvent, EventID, RoomID, SessionID, UserID

from kalandra_core.server.ratelimit import TokenBucket

from .portal_work import FromMatrix


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event failed for a missing room key, waiting for the key (encryption/e2ee.py)."""

    event: EncryptedEvent
    failed: asyncio.Future[None]  # done once its failure is recorded
    place: int  # its place in the portal's queue: late events are bridged in this order


# Per portal, the events failed for a missing room key.
Late = dict[EventID, LateEvent]


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class E2eeState:
    """End-to-bridge encryption's (encryption/e2ee.py)."""

    # Megolm sessions asked for (once: a request is repeated by its own task).
    requested: set[SessionID] = field(default_factory=set)
    late: dict[RoomID, Late] = field(default_factory=dict)
    late_locks: dict[RoomID, asyncio.Lock] = field(default_factory=dict)
    # Per target event (failed for a missing room key), the relations to it held until it is
    # bridged or given up, in arrival order.
    held: dict[EventID, list[FromMatrix]] = field(default_factory=dict)
    # The targets released lately (their relations looked at again after them), in order.
    released: dict[EventID, None] = field(default_factory=dict)
    # Rooms whose state the bot fetched and found unencrypted: mautrix's state store records
    # only that a room is encrypted (set when its m.room.encryption comes).
    seen_clear: set[RoomID] = field(default_factory=set)
    refreshed: asyncio.Event | None = None  # set once the device lists are queried at startup
    # Set once the key waits of before a restart are resumed (app.py clears it at start-up):
    # relations wait for it before they look for their target among the waits (e2ee.hold).
    resumed: asyncio.Event = field(default_factory=_set_event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: bool = False


@dataclass
class CatchUpState:
    """Whether Synapse may have lost events for the bridge (appservice/catch_up.py)."""

    suspect: bool = False  # a request to it failed to connect, or was cut
    last_txn: int | None = None  # the number of the last transaction it sent

    def homeserver_unreachable(self) -> None:
        """A request to the homeserver failed to connect or was cut: it may have restarted."""
        self.suspect = True


@dataclass
class RunState:
    e2ee: E2eeState = field(default_factory=E2eeState)
    catch_up: CatchUpState = field(default_factory=CatchUpState)
    # Room id -> Matrix users granted entry (access.py: the table, in memory; one bridge
    # process writes it).
    granted: dict[bytes, set[UserID]] = field(default_factory=dict)
    # (room, epoch) whose send-chain floors are applied to the bot's state
    # (members/send_chains.py).
    floors_applied: set[tuple[bytes, int]] = field(default_factory=set)
    # Room id -> the room's next log index when this process started (bot.py, before any
    # portal runs): only entries below it can have been seen, and sent to Matrix, by an earlier
    # process (the Kalandra server is embedded: it sequences only while this process runs). A
    # room missing here was made by this process.
    log_heads: dict[bytes, int] = field(default_factory=dict)
    # The bridge-wide budget of PENDING message statuses (portal/statuses.py), once used.
    pending_statuses: TokenBucket | None = None
