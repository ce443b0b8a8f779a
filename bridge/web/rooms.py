"""The provisioning API's portal endpoints: the ``list``, ``create``, ``open``, ``bridge`` and
``unbridge`` commands over HTTP (provisioning.py has the rest: auth, errors, whoami), with the
commands' access policy (access.py): a user lists and opens only the rooms they are in."""

from __future__ import annotations

import binascii
import logging
import re

from aiohttp import web
from mautrix.errors import IntentError, MatrixRequestError
from mautrix.types import EventType, MessageType, RoomID, TextMessageEventContent

from kalandra_core.client.room import ClientRoom

from .. import access
from .requests import ApiError, Requests, room_json

log = logging.getLogger("kalandra.bridge.provisioning")

_MATRIX_ROOM = re.compile(r"![^\s]+")  # (room v12 ids have no server name)
_MAX_NAME = 255


class RoomEndpoints:
    def __init__(self, api: Requests) -> None:
        self.api = api
        self.bridge = api.bridge

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _room_id(request: web.Request) -> bytes:
        text = request.match_info["room"].removeprefix("0x")
        try:
            room_id = bytes.fromhex(text)
        except (ValueError, binascii.Error):
            room_id = b""
        if len(room_id) != 16:
            raise ApiError(400, "M_INVALID_PARAM", "The room id is 16 bytes in hex")
        return room_id

    def _active_room(self, room_id: bytes) -> ClientRoom:
        room = self.bridge.bot.core.rooms.get(room_id)
        if room is None or not room.active:
            raise ApiError(
                404, "M_NOT_FOUND", f"The bridge is not a member of Kalandra room {room_id.hex()}"
            )
        return room

    async def _name_topic(self, room_id: bytes) -> tuple[str, str]:
        assert self.bridge.kalandra is not None
        state = await self.bridge.kalandra.store.load_room(room_id)
        return ("", "") if state is None else (state.room.name, state.room.topic)

    # --- endpoints ------------------------------------------------------------------------------

    async def list_rooms(self, request: web.Request) -> web.Response:
        """The portals of the rooms the user is in (admins: all, ``"admin_view": true``)."""
        user_id, _ = self.api.acting_user(request, "user")
        portals = await self.bridge.portals.load_all()
        admin = access.is_admin(self.bridge, user_id)
        if not admin:
            mine = set(await access.rooms_of(self.bridge, user_id, [p.room_id for p in portals]))
            portals = [p for p in portals if p.room_id in mine]
        return web.json_response({"rooms": [room_json(p) for p in portals], "admin_view": admin})

    async def create_room(self, request: web.Request) -> web.Response:
        """A new Kalandra room and its portal, the user invited (as ``create``)."""
        user_id, _ = self.api.acting_user(request, "user")
        body = await self.api.json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
            raise ApiError(400, "M_BAD_JSON", f"name: a non-empty string, {_MAX_NAME} at most")
        self.api.require_ready()
        bot = self.bridge.bot
        assert bot.client is not None
        room_id = await bot.client.create_room(name=name.strip())
        await bot.state.flush()  # the room's MLS state is saved before the portal points at it
        portal = await self.bridge.portals.get_or_create(
            room_id,
            name=name.strip(),
            topic="",
            last_log_index=bot.core.rooms[room_id].last_seen,
        )
        await access.grant(self.bridge, room_id, user_id, f"creator:{user_id}")
        await portal.ensure_matrix_room(invite=[user_id])
        return web.json_response(room_json(portal), status=201)

    async def open_room(self, request: web.Request) -> web.Response:
        """The portal of a Kalandra room the bridge is in (made if needed), the user invited
        (as ``open``)."""
        user_id, _ = self.api.acting_user(request, "user")
        room_id = self._room_id(request)
        self.api.require_ready()
        if not await access.may_see(self.bridge, room_id, user_id):
            # The same answer as for a room that does not exist.
            raise ApiError(
                404, "M_NOT_FOUND", f"{room_id.hex()} is not a Kalandra room you are in"
            )
        self._active_room(room_id)
        portal = await self.bridge.portals.open(room_id)
        member = access.is_admin(self.bridge, user_id) or await access.member_in_room(
            self.bridge, room_id, user_id
        )
        await portal.let_in(user_id, with_history=member)  # (as the open command)
        return web.json_response(room_json(portal))

    async def bridge_room(self, request: web.Request) -> web.Response:
        """Make an existing Matrix room, where the user and the bot are, the portal of a
        Kalandra room (as ``bridge``; admins)."""
        user_id, _ = self.api.acting_user(request, "admin")
        room_id = self._room_id(request)
        body = await self.api.json_body(request)
        mxid = body.get("matrix_room_id")
        if not isinstance(mxid, str) or not _MATRIX_ROOM.fullmatch(mxid):
            raise ApiError(400, "M_BAD_JSON", "matrix_room_id: a Matrix room id")
        matrix_room = RoomID(mxid)
        self.api.require_ready()
        room = self._active_room(room_id)
        if self.bridge.portals.by_mxid(matrix_room) is not None:
            raise ApiError(409, "KALANDRA_ALREADY_BRIDGED", f"{mxid} is a portal already")
        existing = self.bridge.portals.get(room_id)
        if existing is not None and existing.mxid is not None:
            raise ApiError(
                409,
                "KALANDRA_ALREADY_BRIDGED",
                f"Kalandra room {room_id.hex()} is bridged already, to {existing.mxid}",
            )
        intent = self.bridge.az.intent
        try:
            await intent.ensure_joined(matrix_room)
            members = await intent.get_joined_members(matrix_room)
        except (IntentError, MatrixRequestError):
            raise ApiError(
                403, "KALANDRA_BOT_NOT_IN_ROOM", "The bot is not in that room (invite it first)"
            ) from None
        if user_id not in members:
            raise ApiError(403, "M_FORBIDDEN", f"{user_id} is not in that room")
        if existing is not None:  # a portal whose Matrix room was never made: replaced
            self.bridge.portals.forget(existing)
            await existing.stop()
        name, topic = await self._name_topic(room_id)
        try:
            portal = await self.bridge.portals.bridge_existing(
                room_id,
                matrix_room,
                name=name,
                topic=topic,
                last_log_index=room.last_seen,
            )
        except MatrixRequestError as exc:
            raise ApiError(
                403,
                "KALANDRA_BOT_NOT_PERMITTED",
                f"The bot could not mark the room as bridged ({exc.errcode}): it needs the"
                " power level to send state events there",
            ) from None
        log.info("portal %s bridged to an existing room for %s", portal.hex, user_id)
        return web.json_response(room_json(portal))

    async def unbridge(self, request: web.Request) -> web.Response:
        """Disconnect a portal (as ``unbridge``; admins): the Kalandra room stays."""
        user_id, _ = self.api.acting_user(request, "admin")
        room_id = self._room_id(request)
        self.api.require_ready()
        portal = self.bridge.portals.get(room_id)
        if portal is None or portal.mxid is None:
            raise ApiError(404, "M_NOT_FOUND", f"Kalandra room {room_id.hex()} is not bridged")
        answer = room_json(portal)
        notice = TextMessageEventContent(
            msgtype=MessageType.NOTICE,
            body=f"{user_id} unbridged this room from Kalandra room `{portal.hex}`: the bot"
            " leaves. The Kalandra room stays.",
        )
        try:  # said before the bot leaves (it could not after); the unbridging does not wait
            await self.bridge.az.intent.send_message_event(
                portal.mxid, EventType.ROOM_MESSAGE, notice
            )
        except MatrixRequestError as exc:
            log.warning("portal %s: unbridge notice not sent (%s)", portal.hex, exc.errcode)
        await portal.unbridge()
        return web.json_response(answer)
