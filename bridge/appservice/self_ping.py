"""The start-up check that the homeserver reaches the bridge, without depending on the
homeserver's answer to it.

mautrix checks the connection by asking the homeserver to ping the appservice (MSC2659) and
retries a failed answer with growing pauses (4, 8, 16, 32 s...), then exits. Synapse sometimes
answers 502 ("AlreadyCalled: Tried to cancel an already-called event", a race in its HTTP
client's timeout) for a minute on end although its ping reached the bridge and got its 200:
the bridge then started a minute late (seen after kill -9 restarts). What the check is for,
the homeserver reaching the bridge, is proven by the ping arriving with our transaction id.
So the pings the appservice receives are noted, and a failed answer to a ping that arrived is
taken as success; other failures are retried every second, a bounded number of times, as
quickly as the homeserver comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from mautrix.api import Method, Path
from mautrix.errors import MatrixError

if TYPE_CHECKING:
    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.self_ping")

ATTEMPTS = 30  # one a second: then the error stands (mautrix exits 16)
_PATHS = ("/_matrix/app/v1/ping", "/_matrix/app/unstable/fi.mau.msc2659/ping")


class Pings:
    """The transaction ids of the pings the appservice answered (this process)."""

    def __init__(self) -> None:
        self.received: set[str] = set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "POST" and request.path in _PATHS and response.status == 200:
            try:
                txn_id = json.loads(await request.read()).get("transaction_id")
            except (ValueError, AttributeError):
                txn_id = None
            if isinstance(txn_id, str):
                self.received.add(txn_id)
        return response


async def ping_self(
    request: Callable[[str], Awaitable[int]],
    received: set[str],
    txn_id: str,
    *,
    attempts: int = ATTEMPTS,
    pause: float = 1.0,
) -> int:
    """``request(txn_id)`` asks the homeserver to ping us (the round trip in ms); returns it,
    or -1 when the answer failed but the ping arrived (see the module doc)."""
    for attempt in range(1, attempts + 1):
        try:
            return await request(txn_id)
        except (MatrixError, OSError, TimeoutError) as exc:
            if txn_id in received:
                log.info(
                    "the homeserver reached the bridge (its answer to the ping failed: %s)",
                    type(exc).__name__,
                )
                return -1
            if attempt == attempts:
                raise
            log.warning("homeserver -> bridge ping failed (%s); again", type(exc).__name__)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")


def install(bridge: BridgeContext) -> None:
    az = bridge.az
    pings = Pings()
    az.app.middlewares.append(pings.middleware)

    async def once(txn_id: str) -> int:
        response = await az.intent.api.request(
            Method.POST,
            Path.v1.appservice[az.id].ping,
            content={"transaction_id": txn_id},
            retry_count=0,
        )
        return int(response.get("duration_ms") or -1)

    async def ping(txn_id: str | None = None) -> int:
        return await ping_self(once, pings.received, txn_id or az.intent.api.get_txn_id())

    az.ping_self = ping  # type: ignore[method-assign]  # what mautrix's start-up check calls
