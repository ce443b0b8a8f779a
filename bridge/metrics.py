"""Prometheus metrics of the bridge, in the default registry: mautrix serves it at
``metrics.hostname:metrics.listen_port`` (its Program.start_prometheus) together with its own.

Messages bridged and their latency per direction: toward Matrix from the Kalandra log
timestamp to Synapse accepting the ghost's send; toward Kalandra from the Matrix event's
origin_server_ts to the Kalandra server sequencing it. Queue depths are read from the portals
when scraped. Failures are counted by direction and reason (toward Kalandra: the status event's
reason; toward Matrix: the homeserver's errcode, else the error's type, each a retry). The
appservice transactions are counted by what Synapse was answered.

The portal queues and the status sender call the functions below; :func:`install` adds what
is read from the bridge itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from collections.abc import Callable

    from mautrix.appservice import AppService
    from mautrix.types import Event, RoomID


TO_MATRIX = "to_matrix"
TO_KALANDRA = "to_kalandra"

MESSAGES = Counter(
    "kalandra_bridge_messages",
    "Messages bridged, by direction",
    ["direction"],
)
LATENCY = Histogram(
    "kalandra_bridge_latency_seconds",
    "From a message's origin timestamp to its bridged send completing, by direction",
    ["direction"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_DEPTH = Gauge(
    "kalandra_bridge_queue_depth",
    "Items waiting in the portals' queues, by direction",
    ["direction"],
)
EPOCH_CHANGES = Counter(
    "kalandra_bridge_epoch_changes",
    "MLS epoch changes mirrored into portals",
)
FAILURES = Counter(
    "kalandra_bridge_failures",
    "Failed sends, by direction and reason",
    ["direction", "reason"],
)
SET_ASIDE = Counter(
    "kalandra_bridge_set_aside",
    "Items set aside with a notice (the homeserver refused them for good, or a kept history"
    " message could not be read), by direction and errcode (or unreadable)",
    ["direction", "reason"],
)
ENCRYPT = Histogram(
    "kalandra_bridge_megolm_encrypt_seconds",
    "Encrypting one event for an encrypted portal (with the sharing of a new Megolm session"
    " when one starts), by the device that encrypts: a ghost's own, or the bot's (msc4350:"
    " the bot's, impersonating the ghost)",
    ["device"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
GHOST_DEVICE_SETUP = Histogram(
    "kalandra_bridge_ghost_device_setup_seconds",
    "Making a ghost's device: MSC4190 device, Olm account and keys uploaded, cross-signing"
    " keys uploaded and the device signed",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESEND_LOOKUPS = Counter(
    "kalandra_bridge_resend_lookups",
    "Messages looked for in their Matrix room before being sent (maybe sent before: after a"
    " failed attempt, the first ones after a start, a split message): a homeserver request each",
)
TRANSACTIONS = Counter(
    "kalandra_bridge_appservice_transactions",
    "Appservice transactions from the homeserver, by the HTTP status answered",
    ["status"],
)

# Matrix events on their way to Kalandra: event id -> origin_server_ts (ms). Bounded: events
# that are neither bridged nor refused (a replay of a handled one) age out.
_ORIGIN_LIMIT = 10_000
_origins: OrderedDict[str, int] = OrderedDict()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _observe(direction: str, origin_ms: int) -> None:
    MESSAGES.labels(direction).inc()
    # Clocks of other machines (and HLC timestamps) may run a little ahead: never negative.
    LATENCY.labels(direction).observe(max(0, _now_ms() - origin_ms) / 1000)


def bridged_to_matrix(timestamp_ms: int) -> None:
    """A Kalandra message (its log timestamp) was sent to Matrix."""
    _observe(TO_MATRIX, timestamp_ms)


def matrix_event_seen(event_id: str, origin_server_ts: int) -> None:
    _origins[event_id] = origin_server_ts
    while len(_origins) > _ORIGIN_LIMIT:
        _origins.popitem(last=False)


def bridged_to_kalandra(event_id: str) -> None:
    """A Matrix message was sequenced in Kalandra."""
    origin = _origins.pop(event_id, None)
    if origin is None:
        MESSAGES.labels(TO_KALANDRA).inc()
    else:
        _observe(TO_KALANDRA, origin)


def failed_to_kalandra(event_id: str, reason: str) -> None:
    _origins.pop(event_id, None)
    FAILURES.labels(TO_KALANDRA, reason).inc()


def failed_to_matrix(exc: BaseException) -> None:
    """A send to Matrix failed (it is retried in place)."""
    errcode = getattr(exc, "errcode", None)
    FAILURES.labels(TO_MATRIX, errcode if isinstance(errcode, str) else type(exc).__name__).inc()


def set_aside_to_matrix(reason: str) -> None:
    """A Kalandra item the homeserver refused for good (portal/set_aside.py)."""
    SET_ASIDE.labels(TO_MATRIX, reason).inc()


def epoch_changed() -> None:
    EPOCH_CHANGES.inc()


def install(
    az: AppService,
    depths: Callable[[], tuple[int, int]],
    is_portal: Callable[[RoomID], bool],
) -> None:
    """Queue depths (``depths()``: toward Matrix, toward Kalandra), Matrix origin timestamps of
    portal events (``is_portal``) and transaction outcomes, read from the bridge. After the
    transaction gate is installed: its answer (500 when not processed) is counted."""
    QUEUE_DEPTH.labels(TO_MATRIX).set_function(lambda: depths()[0])
    QUEUE_DEPTH.labels(TO_KALANDRA).set_function(lambda: depths()[1])
    inner = az.handle_matrix_event

    async def handle_matrix_event(event: Event, ephemeral: bool = False) -> None:
        event_id = getattr(event, "event_id", None)
        origin = getattr(event, "timestamp", None)
        if not ephemeral and event_id and isinstance(origin, int):
            room_id = getattr(event, "room_id", None)
            if room_id is not None and is_portal(room_id):
                matrix_event_seen(event_id, origin)
        await inner(event, ephemeral)

    az.handle_matrix_event = handle_matrix_event  # type: ignore[method-assign]

    @web.middleware
    async def count_transactions(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "PUT" or "/transactions/" not in request.path:
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            TRANSACTIONS.labels(str(exc.status)).inc()
            raise
        TRANSACTIONS.labels(str(response.status)).inc()
        return response

    az.app.middlewares.insert(0, count_transactions)  # outermost: sees the final answer
