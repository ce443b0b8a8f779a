"""Bridged Matrix users: a Matrix user (permission ``user``) as a real Kalandra member.

The bridge creates the member's account, device signing key and device token (sealed in
bridge_users), and the bot adds it to a portal's room with a Commit, from a KeyPackage built
with the member's key. The member never processes commits: one MLS group state per portal (the
bot's). Every sender's key derives from the epoch's exporter, so the bot's SenderKeyStore
encrypts as the member's leaf; the frame goes out through the member's own in-process session
(a loopback connection authenticated with the member's token and signed with its key), so the
server checks it like any native client's. The Welcome of the add waits in the member's
mailbox, unused.

No duplicate, no key reuse: the signed frame of a Matrix event and the generation it used are
written before the frame leaves (db/outgoing.py). A replay of the event after a crash resends
the same bytes, which the server answers from its log with the original log index; and the
bot's send chains are moved past every recorded generation before the first send of a room
after a start (send_chains.py), since its saved room state may be older than its last sends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey

from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.mls.keypackage import build_key_package
from kalandra_core.proto import (
    ErrorCode,
    ErrorPayload,
    Frame,
    HelloReply,
    Opcode,
    ProtocolError,
    decode_payload,
)
from kalandra_core.storage.base import AlreadyExists
from kalandra_core.transport.interface import FrameSink
from kalandra_core.transport.loopback import connect_loopback

from ..db import BridgedUserRow, BridgedUserTable, Outgoing, OutgoingTable, SendMark
from .send_chains import ensure_send_floors

if TYPE_CHECKING:
    from mautrix.types import EventID, UserID

    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.user")

MAX_ATTEMPTS = 3
_TIMEOUT = 15.0
# Logged frames of the member's whose echo from the log answers the request (portal/relations.py).
_ECHOED = frozenset({Opcode.APP_MESSAGE, Opcode.APP_REACTION, Opcode.APP_RECEIPT})


class SendFailed(RuntimeError):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
_RETRY_MARK = "_-"  # never in an escaped MXID ("_" is followed by "_" or a hex digit there)


def member_name(mxid: str) -> str:
    """The Kalandra account name for a Matrix user: ``mx_`` and the MXID without its ``@``,
    escaped reversibly into ``[a-z0-9._-]``: ``:`` is ``__``, any other character outside
    ``[a-z0-9.-]`` is ``_`` and the hex of each of its UTF-8 bytes (``_`` is ``_5f``, ``A`` is
    ``_41``). Two MXIDs never share a name (``@x_y:80`` and ``@x:y:80`` did, once)."""
    out = ["mx_"]
    for char in mxid.removeprefix("@"):
        if char in _PLAIN:
            out.append(char)
        elif char == ":":
            out.append("__")
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode())
    return "".join(out)


def mxid_of_member_name(name: str) -> str | None:
    """The inverse of :func:`member_name` (None: not such a name)."""
    if not name.startswith("mx_"):
        return None
    raw, i, text = bytearray(), 3, name
    while i < len(text):
        if text[i] != "_":
            if text[i] not in _PLAIN:
                return None
            raw += text[i].encode()
            i += 1
        elif text[i + 1 : i + 2] == "_":
            raw += b":"
            i += 2
        else:
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdef" for c in pair):
                return None
            raw.append(int(pair, 16))
            i += 3
    try:
        return "@" + raw.decode()
    except UnicodeDecodeError:
        return None


class _Session:
    """The puppet's end of its loopback connection: replies to its own requests, nothing
    else (the room's broadcasts and the unused Welcome are dropped)."""

    def __init__(self, owner: BridgedUser) -> None:
        self.owner = owner

    def frame_received(self, frame: Frame) -> None:
        h = frame.header
        future = self.owner.futures.get(h.request_id)
        if future is None or future.done():
            return
        if h.opcode in (Opcode.HELLO_REPLY, Opcode.ERROR) or (
            h.opcode in _ECHOED and h.sender_id == self.owner.member_id
        ):
            future.set_result(frame)

    def protocol_error(self, error: ProtocolError) -> None:
        log.warning("framing error on a bridged user's session: %s", type(error).__name__)

    def connection_lost(self, reason: str) -> None:
        self.owner.lost()


class BridgedUsers:
    """The Matrix users the bridge holds Kalandra members for: one directory per bridge
    process (app.py), made at their first need and kept."""

    def __init__(self, bridge: BridgeContext) -> None:
        self.bridge = bridge
        self._by_mxid: dict[str, BridgedUser] = {}
        self.member_ids: set[int] = set()  # every bridged user's member id (echo filter)
        self._locks: dict[str, asyncio.Lock] = {}

    async def load_member_ids(self) -> None:
        self.member_ids.update(await _table(self.bridge).member_ids())

    def find(self, mxid: str) -> BridgedUser | None:
        """The user's bridged member if this process has it loaded already."""
        return self._by_mxid.get(mxid)

    async def get(self, mxid: UserID, permission: str) -> BridgedUser:
        user = self._by_mxid.get(mxid)
        if user is not None:
            return user
        async with self._locks.setdefault(mxid, asyncio.Lock()):
            user = self._by_mxid.get(mxid)
            if user is None:
                user = await _load_or_create(self.bridge, mxid, permission)
                self._by_mxid[mxid] = user
                self.member_ids.add(user.member_id)
            return user

    async def close_all(self) -> None:
        for user in self._by_mxid.values():
            await user.close()


async def _load_or_create(bridge: BridgeContext, mxid: UserID, permission: str) -> BridgedUser:
    table = _table(bridge)
    row = await table.get(mxid)
    if row is not None and row.member_id is not None and row.signing_key is not None:
        return BridgedUser(bridge, mxid, row.member_id, row.signing_key, row.device_token)
    assert bridge.kalandra is not None
    store = bridge.kalandra.store
    # Only an account made here and recorded in bridge_users is ever this user's: one that
    # merely has the name (made by an operator or anyone else, or by us just before a crash
    # kept us from recording it) is never adopted; the user gets a fresh one.
    name = member_name(mxid)
    account = None
    while account is None:
        try:
            account = await store.create_member(name)
        except AlreadyExists:
            name = f"{member_name(mxid)}{_RETRY_MARK}{secrets.token_hex(3)}"
    key = bytes(SigningKey.generate())
    await table.put(
        BridgedUserRow(
            mxid=mxid, permission=permission, member_id=account.member_id, signing_key=key
        )
    )
    log.info("created Kalandra member %d for a bridged Matrix user", account.member_id)
    return BridgedUser(bridge, mxid, account.member_id, key)


class BridgedUser:
    def __init__(
        self,
        bridge: BridgeContext,
        mxid: UserID,
        member_id: int,
        key: bytes,
        token: str | None = None,
    ) -> None:
        self.bridge = bridge
        self.mxid = mxid
        self.member_id = member_id
        self.signing_key = key
        self.token = token
        self.core = ClientCore(member_id, key)  # frames only: no rooms, no MLS state
        self.futures: dict[int, asyncio.Future[Frame]] = {}
        self._sink: FrameSink | None = None
        self._connect_lock = asyncio.Lock()

    # --- the session ---------------------------------------------------------------------------

    def lost(self) -> None:
        self._sink = None
        for future in self.futures.values():
            if not future.done():
                future.set_exception(SendFailed("connection lost"))

    async def request(self, request_id: int, data: bytes) -> Frame:
        """Send a frame of this member's (built by its core) and wait for the answer."""
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.futures[request_id] = future
        try:
            if self._sink is None or not self._sink.send(data):
                raise SendFailed("not connected")
            return await asyncio.wait_for(future, _TIMEOUT)
        finally:
            self.futures.pop(request_id, None)

    def send_unanswered(self, data: bytes) -> bool:
        """Send a frame nothing answers (typing); False when not connected."""
        return self._sink is not None and self._sink.send(data)

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._sink is not None:
                return
            if self.token is not None:
                try:
                    await self._hello(self.token)
                    return
                except SendFailed as exc:
                    if exc.code != ErrorCode.NOT_AUTHORIZED:
                        raise
                    log.warning("member %d: stored device token refused", self.member_id)
                    await self.close()
            # The first connect (or a revoked token): one token, kept for the next ones.
            assert self.bridge.kalandra is not None
            token = await self.bridge.kalandra.store.issue_token(self.member_id)
            await _table(self.bridge).set_device_token(self.mxid, token)
            self.token = token
            await self._hello(token)

    async def _hello(self, token: str) -> None:
        assert self.bridge.kalandra is not None
        hub = self.bridge.kalandra.hub
        self._sink = connect_loopback(hub.session_factory, lambda _sink: _Session(self))
        hello = self.core.hello(token, now=time.time())
        try:
            reply = await self.request(Frame.decode(hello).header.request_id, hello)
            _raise_error(reply)
        except BaseException:
            await self.close()  # not authenticated: the next connect starts over
            raise
        payload = decode_payload(Opcode.HELLO_REPLY, reply.payload)
        assert isinstance(payload, HelloReply)
        self.core.hello_reply(payload)

    async def close(self) -> None:
        if self._sink is not None:
            self._sink.close("bridge stopping")
            self._sink = None

    # --- rooms and messages ----------------------------------------------------------------------

    async def ensure_in_room(self, room_id: bytes) -> None:
        """The bot adds this member to the room (a Commit) unless it is a member already."""
        await self.connect()  # binds the device key before any KeyPackage names it
        bot = self.bridge.bot
        assert bot.client is not None
        if self._in_room(room_id):
            return
        async with bot.commit_lock:
            if self._in_room(room_id):
                return
            package = build_key_package(self.member_id, self.signing_key).key_package
            index = await bot.client.add(room_id, [package])
            await bot.state.flush()
        log.info(
            "added bridged member %d to %s (log index %d)", self.member_id, room_id.hex(), index
        )

    def _in_room(self, room_id: bytes) -> bool:
        room = self.bridge.bot.core.rooms.get(room_id)
        if room is None or not room.active:
            raise SendFailed("the bridge is not in this Kalandra room")
        return self.member_id in room.roster()

    async def send(self, room_id: bytes, content: Content, event_id: EventID) -> int:
        """Send as this member's leaf; returns the message's log index. A frame prepared for
        ``event_id`` before a crash is resent as it was (at most one message per event)."""
        outgoing = OutgoingTable(self.bridge.db)
        prepared = await outgoing.get(event_id)
        await self.ensure_in_room(room_id)
        if prepared is not None and prepared.sender_id == self.member_id:
            log.info("member %d: resending the recorded frame of a replayed event", self.member_id)
            reply = await self.request(prepared.request_id, prepared.frame)
            if reply.header.opcode == Opcode.APP_MESSAGE:
                return reply.header.context_id  # sequenced before the crash, or just now
            try:
                _raise_error(reply)
            except SendFailed as exc:
                if exc.code != ErrorCode.STALE_EPOCH:
                    raise
            # Never sequenced, and its epoch is over: encrypt it afresh below.
        plaintext = content.encode()

        async def attempt() -> Frame:
            # Floors of the epoch this encryption uses (a retry after STALE_EPOCH: a newer one).
            await ensure_send_floors(self.bridge, room_id)
            room = self.bridge.bot.core.rooms[room_id]
            leaf = room.roster()[self.member_id][0]
            envelope = room.keys.encrypt(plaintext, sender_index=leaf)
            rid, data = self.core.build_frame(
                Opcode.APP_MESSAGE,
                envelope,
                room_int=room.room_int,
                epoch=room.epoch,
                now=time.time(),
            )
            await outgoing.prepare(
                Outgoing(event_id, room_id, self.member_id, rid, data),
                SendMark(envelope.epoch, leaf, envelope.generation),
            )
            return await self.request(rid, data)

        return await self.at_current_epoch(room_id, attempt)

    async def at_current_epoch(
        self, room_id: bytes, attempt: Callable[[], Awaitable[Frame]]
    ) -> int:
        """``attempt()`` builds a frame at the epoch the bot's group is in for the room, sends
        it and returns the answer; a STALE_EPOCH answer (a commit the bot has not applied yet)
        catches the bot up and attempts again. The bridge's one recovery from a stale epoch
        for its puppet leaves. The log index the frame got."""
        bot = self.bridge.bot
        assert bot.client is not None
        for number in range(1, MAX_ATTEMPTS + 1):
            reply = await attempt()
            try:
                _raise_error(reply)
            except SendFailed as exc:
                if exc.code != ErrorCode.STALE_EPOCH or number == MAX_ATTEMPTS:
                    raise
                await bot.client.sync(room_id)  # catch up the bot's group, then build again
                continue
            return reply.header.context_id
        raise SendFailed("stale epoch")  # not reached


def _table(bridge: BridgeContext) -> BridgedUserTable:
    key = bridge.config.mls_state_key
    assert key is not None
    return BridgedUserTable(bridge.db, key)


def _raise_error(frame: Frame) -> None:
    if frame.header.opcode == Opcode.ERROR:
        payload: Any = decode_payload(Opcode.ERROR, frame.payload)
        assert isinstance(payload, ErrorPayload)
        raise SendFailed(payload.message, payload.code)
