"""Readiness: ``/_matrix/mau/ready`` answers 200 only while the whole service can work.

mautrix's probe says ready once its own start-up is over, and stays so during a stop. Here it
also needs the embedded Kalandra server running, the bot's Kalandra client up and the
homeserver connection checked (portals send to Matrix only then); otherwise 503, naming what
is missing. Ready, it also says how many of the bot's rooms are still catching up since the
start (``rooms_catching_up``): they do so behind new work, so the bridge is usable meanwhile.
``/_matrix/mau/live`` stays mautrix's.

A transaction the bridge refuses (too large, or not processed) is sent again by Synapse, and
nothing after it reaches the bridge until one is accepted: from the refusal until a later
transaction is acknowledged the probe answers 503 with ``transactions`` among what it waits for
and the refused transaction's id and reason, and the refusal is logged at error level, once per
transaction id (no content).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from .context import BridgeContext

READY_PATH = "/_matrix/mau/ready"
log = logging.getLogger("kalandra.bridge.health")
_LOGGED_LIMIT = 1000  # refused transaction ids remembered for "once per id"


class Transactions:
    """The last refused appservice transaction, until one is acknowledged after it."""

    def __init__(self) -> None:
        self.refused: tuple[str, str] | None = None  # (transaction id, reason)
        self._logged: OrderedDict[str, None] = OrderedDict()

    def refuse(self, txn_id: str, reason: str) -> None:
        self.refused = (txn_id, reason)
        if txn_id in self._logged:
            return
        self._logged[txn_id] = None
        while len(self._logged) > _LOGGED_LIMIT:
            self._logged.popitem(last=False)
        log.error(
            "appservice transaction %s refused (%s): the homeserver will send it again, and"
            " nothing after it is bridged until it is accepted",
            txn_id,
            reason,
        )

    def acknowledged(self, txn_id: str) -> None:
        if self.refused is not None:
            log.info("appservice transaction %s accepted: transactions flow again", txn_id)
        self.refused = None
        self._logged.pop(txn_id, None)


TRANSACTIONS = Transactions()  # one appservice per process


def not_ready(bridge: BridgeContext) -> list[str]:
    """What the service still waits for (empty: ready)."""
    missing = []
    if bridge.kalandra is None:
        missing.append("kalandra_server")
    bot = getattr(bridge, "bot", None)
    if bot is None or bot.client is None:
        missing.append("bot")
    if not bridge.matrix_ready.is_set() or not bridge.az.ready:
        missing.append("homeserver")
    return missing


def catching_up(bridge: BridgeContext) -> int:
    """The bot's rooms not caught up yet since it connected: they catch up behind new work,
    each at once when something happens in it."""
    bot = getattr(bridge, "bot", None)
    return 0 if bot is None or bot.client is None else len(bot.core.catching_up)


def install(bridge: BridgeContext) -> None:
    @web.middleware
    async def readiness(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != READY_PATH or request.method != "GET":
            return await handler(request)
        missing = not_ready(bridge)
        if TRANSACTIONS.refused is not None:  # (provisioning still works meanwhile)
            missing.append("transactions")
        if missing:
            body: dict[str, object] = {"ready": False, "waiting_for": missing}
            if TRANSACTIONS.refused is not None:
                txn_id, reason = TRANSACTIONS.refused
                body["refused_transaction"] = {"id": txn_id, "reason": reason}
            return web.json_response(body, status=503)
        return web.json_response({"ready": True, "rooms_catching_up": catching_up(bridge)})

    bridge.az.app.middlewares.append(readiness)
