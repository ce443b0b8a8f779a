"""Readiness: ``/_matrix/mau/ready`` answers 200 only while the whole service can work.

mautrix's probe says ready once its own start-up is over, and stays so during a stop. Here it
also needs the embedded Kalandra server running, the bot's Kalandra client up and the
homeserver connection checked (portals send to Matrix only then); otherwise 503, naming what
is missing. ``/_matrix/mau/live`` stays mautrix's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .bridge import KalandraBridge
    from .transactions import Handler

READY_PATH = "/_matrix/mau/ready"


def not_ready(bridge: KalandraBridge) -> list[str]:
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


def install(bridge: KalandraBridge) -> None:
    @web.middleware
    async def readiness(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != READY_PATH or request.method != "GET":
            return await handler(request)
        missing = not_ready(bridge)
        if missing:
            return web.json_response({"ready": False, "waiting_for": missing}, status=503)
        return web.json_response({"ready": True})

    bridge.az.app.middlewares.append(readiness)
