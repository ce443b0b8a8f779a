"""What every provisioning endpoint needs: its errors, the acting user, the JSON body, the
bridge being ready (provisioning.py serves the API; rooms.py its room endpoints)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from mautrix.types import UserID

from ..health import not_ready

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace

LEVELS = ("none", "relay", "user", "admin")
_MXID = re.compile(r"@[^:\s]+:[^\s]+")

Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.errcode = errcode
        self.error = error


def error_response(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


def room_json(portal: PortalFace) -> dict[str, Any]:
    return {
        "room_id": portal.hex,
        "matrix_room_id": portal.mxid,
        "alias": portal.alias,
        "name": portal.row.name,
        "relay": bool(portal.row.relay_enabled),
    }


class Requests:
    """The checks of a request that depend on the bridge: who acts, and whether it is ready."""

    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge

    def acting_user(self, request: web.Request, needs: str = "none") -> tuple[UserID, str]:
        """The user the call is for, and its permission level (at least ``needs``)."""
        user_id = request.query.get("user_id", "")
        if not _MXID.fullmatch(user_id):
            raise ApiError(400, "M_INVALID_PARAM", "user_id must be a Matrix user id")
        level = self.bridge.config.permission_level(user_id)
        if LEVELS.index(level) < LEVELS.index(needs):
            raise ApiError(403, "M_FORBIDDEN", f"This needs the {needs} permission")
        return UserID(user_id), level

    def require_ready(self) -> None:
        if not_ready(self.bridge):
            raise ApiError(503, "KALANDRA_NOT_READY", "The bridge is starting or stopping")

    @staticmethod
    async def json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "M_NOT_JSON", "The body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "M_BAD_JSON", "The body must be a JSON object")
        return body
