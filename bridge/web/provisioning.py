"""The provisioning API: the bot's portal and account commands over HTTP, for integration
managers and scripts, on the appservice's listener under ``bridge.provisioning.prefix``.

Every call carries the shared secret (``Authorization: Bearer <shared_secret>``, from
``bridge.provisioning``) and names the Matrix user it acts for (``?user_id=@you:example.com``);
it is allowed what that user's permission allows with bot commands (``user``; bridging and
unbridging: ``admin``).
Answers are JSON; errors are ``{"errcode", "error"}`` with the HTTP status saying the kind
(400 bad input, 401 secret, 403 permission, 404 unknown room, 409 already bridged, 502 the
Kalandra server refused, 503 not ready). The room endpoints are in rooms.py.

The secret and device tokens are never logged: the secret travels in a header (not in the
access log), and a token only in a response body.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from mautrix.types import Membership

from kalandra_core.client.driver import ClientError

from ..commands.account import LOGIN_CODE_TTL, issue_login_code
from ..db.device_token import token_id
from ..db.roster import bridged_member
from .requests import ApiError, Endpoint, Requests, error_response, room_json
from .rooms import RoomEndpoints

if TYPE_CHECKING:
    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.provisioning")


class ProvisioningAPI:
    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self.prefix = str(bridge.config["bridge.provisioning.prefix"])
        self._secret = str(bridge.config["bridge.provisioning.shared_secret"]).encode()
        self.requests = Requests(bridge)
        self.app = web.Application(middlewares=[self._errors, self._auth])
        rooms = RoomEndpoints(self.requests)
        router = self.app.router
        router.add_get("/v1/whoami", self.whoami)
        router.add_get("/v1/rooms", rooms.list_rooms)
        router.add_post("/v1/rooms", rooms.create_room)
        router.add_post("/v1/rooms/{room}/open", rooms.open_room)
        router.add_post("/v1/rooms/{room}/bridge", rooms.bridge_room)
        router.add_delete("/v1/rooms/{room}/bridge", rooms.unbridge)
        router.add_post("/v1/device-token", self.device_token)
        router.add_post("/v1/login-code", self.login_code)

    def install(self) -> None:
        """Mounted on the appservice's app (before it starts listening)."""
        self.bridge.az.app.add_subapp(self.prefix, self.app)

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Endpoint) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.errcode, exc.error)
        except web.HTTPNotFound:
            return error_response(404, "M_UNRECOGNIZED", "Unknown endpoint")
        except web.HTTPMethodNotAllowed:
            return error_response(405, "M_UNRECOGNIZED", "Method not allowed")
        except ClientError as exc:
            return error_response(502, "KALANDRA_REFUSED", f"The Kalandra server refused: {exc}")
        except TimeoutError:
            return error_response(504, "KALANDRA_TIMEOUT", "The Kalandra server did not answer")
        except Exception as exc:
            log.warning("%s %s failed (%s)", request.method, request.path, type(exc).__name__)
            return error_response(500, "M_UNKNOWN", "Internal error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Endpoint) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(401, "M_MISSING_TOKEN", "Missing Authorization: Bearer header")
        if not hmac.compare_digest(header.removeprefix("Bearer ").encode(), self._secret):
            raise ApiError(401, "M_UNKNOWN_TOKEN", "Invalid shared secret")
        return await handler(request)

    # --- whoami and device tokens ----------------------------------------------------------------

    async def whoami(self, request: web.Request) -> web.Response:
        """The user's permission, its Kalandra member (when the bridge holds one), and the
        portals it is in on either side."""
        user_id, level = self.requests.acting_user(request)
        member_id = await bridged_member(self.bridge.db, user_id)
        state_store = self.bridge.az.state_store
        bot = getattr(self.bridge, "bot", None)
        rooms = {} if bot is None or bot.client is None else bot.core.rooms
        portals = []
        for portal in self.bridge.portals.all():
            matrix = None
            if portal.mxid is not None:
                membership = await state_store.get_membership(portal.mxid, user_id)
                if membership in (Membership.JOIN, Membership.INVITE):
                    matrix = membership.value
            room = rooms.get(portal.room_id)
            kalandra = (
                member_id is not None
                and room is not None
                and room.active
                and member_id in room.roster()
            )
            if matrix is not None or kalandra:
                portals.append({**room_json(portal), "matrix": matrix, "kalandra": kalandra})
        return web.json_response(
            {
                "user_id": user_id,
                "permission": level,
                "kalandra": None if member_id is None else {"member_id": member_id},
                "portals": portals,
            }
        )

    async def device_token(self, request: web.Request) -> web.Response:
        """A device token for the Kalandra member the bridge holds for the user (made now if
        there is none yet), as the ``device-token`` command gives it."""
        user_id, level = self.requests.acting_user(request, "user")
        self.requests.require_ready()
        bridge = self.bridge
        user = await bridge.bridged_users.get(user_id, level)
        # The bridge's key is bound first: a native login must never bind its own.
        await user.connect()
        assert bridge.kalandra is not None
        token = await bridge.kalandra.store.issue_token(user.member_id)
        log.info("device token %s issued to member %d", token_id(token), user.member_id)
        return web.json_response(
            {"member_id": user.member_id, "token_id": token_id(token), "token": token}
        )

    async def login_code(self, request: web.Request) -> web.Response:
        """A single-use login code (10 minutes) for the user's member, as the ``device-token``
        command gives it in an encrypted chat; here the HTTP answer is the private channel."""
        user_id, level = self.requests.acting_user(request, "user")
        self.requests.require_ready()
        user = await self.bridge.bridged_users.get(user_id, level)
        code = await issue_login_code(self.bridge, user)
        log.info("login code issued to member %d", user.member_id)
        return web.json_response(
            {"member_id": user.member_id, "login_code": code, "expires_in": LOGIN_CODE_TTL}
        )
