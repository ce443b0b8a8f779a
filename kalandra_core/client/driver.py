"""The asyncio driver of the native client: connection, reconnects, futures, persistence.

It owns a :class:`ClientCore` and one connection (TCP or QUIC). It turns the core's events into
effects (send, persist, resolve the awaiting coroutine, queue a message for the application),
reconnects with exponential backoff and jitter when the connection drops, and on every
(re)connect syncs every room from its last applied log index and resends its outbox.

The core paces the outbox (a bounded window of frames in flight, pauses on RATE_LIMITED); the
driver only wakes it when a pause is over. Other requests refused with RATE_LIMITED (directory,
room creation) are sent again after the pause too, so a caller never sees rate limiting as an
error, only a later answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from ..backoff import Backoff
from ..media.blob import MediaRef
from ..proto import (
    ErrorCode,
    ErrorPayload,
    Frame,
    HelloReply,
    Opcode,
    ProtocolError,
    decode_payload,
)
from ..transport.interface import FrameSink, SessionFactory
from . import events as ev
from . import media
from .content import Content
from .core import ClientCore
from .state import ClientState

log = logging.getLogger("kalandra.client")

RECONNECT_FIRST_DELAY = 0.2  # seconds; doubled after each failed attempt, up to the cap
RECONNECT_JITTER = 0.25  # each pause is spread by up to this fraction either way


class ClientError(Exception):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class NotYetConfirmed(ClientError):
    """The request is queued (the outbox keeps it across reconnects and restarts) but the server
    has not confirmed it in time. Do not send it again: it will be delivered once."""


Connector = Callable[["ServerAddress", SessionFactory, "bytes | None"], Awaitable[FrameSink]]


async def connect_transport(
    address: ServerAddress, factory: SessionFactory, ca_certificate: bytes | None
) -> FrameSink:
    """The real transports: TCP, or QUIC (verifying against ``ca_certificate`` when given)."""
    from ..transport.quic import connect_quic
    from ..transport.tcp import connect_tcp

    if address.scheme == "quic":
        return await connect_quic(
            address.host,
            address.port,
            factory,
            ca_certificate=ca_certificate,
            verify=ca_certificate is not None,
        )
    return await connect_tcp(address.host, address.port, factory)


@dataclass(frozen=True, slots=True)
class ServerAddress:
    scheme: str  # "tcp" or "quic"
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        parts = urlsplit(url if "://" in url else f"tcp://{url}")
        if parts.scheme not in ("tcp", "quic") or not parts.hostname or not parts.port:
            raise ValueError("server address must look like tcp://host:port or quic://host:port")
        return cls(parts.scheme, parts.hostname, parts.port)

    @classmethod
    def parse_many(cls, text: str) -> list[ServerAddress]:
        """Comma-separated addresses: the processes of one cluster, any of which serves."""
        urls = [url.strip() for url in text.split(",") if url.strip()]
        if not urls:
            raise ValueError("no server address given")
        return [cls.parse(url) for url in urls]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def addresses_text(addresses: Sequence[ServerAddress]) -> str:
    """What ``ServerAddress.parse_many`` reads back."""
    return ",".join(str(address) for address in addresses)


# Answers that resolve the request they echo; the core never sees them (media blocks are not
# room frames).
_DIRECT_REPLIES = frozenset(
    {
        Opcode.HELLO_REPLY,
        Opcode.PONG,
        Opcode.CAS_PUT,
        Opcode.CAS_GET,
        Opcode.CAS_PROOF,
        Opcode.CAS_DELETE,
    }
)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Session:
    """The transport-facing side of one connection: frames in, connection loss, each handed to
    the client with this session, so the client can ignore a connection it has moved on from."""

    def __init__(
        self,
        frame_received: Callable[[_Session, Frame], None],
        connection_lost: Callable[[_Session, str], None],
    ) -> None:
        self._frame_received = frame_received
        self._connection_lost = connection_lost

    def frame_received(self, frame: Frame) -> None:
        self._frame_received(self, frame)

    def protocol_error(self, error: ProtocolError) -> None:
        log.warning("framing error from the server: %s", error)

    def connection_lost(self, reason: str) -> None:
        self._connection_lost(self, reason)


class Client:
    def __init__(
        self,
        core: ClientCore,
        address: ServerAddress | Sequence[ServerAddress],
        token: str,
        *,
        state: ClientState | None = None,
        ca_certificate: bytes | None = None,
        reconnect: bool = True,
        reconnect_max_delay: float = 30.0,
        request_timeout: float = 15.0,
        keepalive: float | None = 15.0,
        connector: Connector | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._connector = connector or connect_transport
        # Wall-clock time (Unix seconds) for the core: its frames' timestamps, the send
        # window's pauses, self-update schedules (a simulation passes its virtual clock).
        self.clock = clock
        self.request_timeout = request_timeout
        # Ping the server this often (seconds); no Pong within as long again means the
        # connection is dead (a crashed server leaves QUIC silent until its idle timeout).
        self.keepalive = keepalive
        self.core = core
        # Several: processes of one cluster (any serves every room). A connection that fails,
        # or is lost, moves on to the next, so a dead process is not waited for.
        self.addresses = (address,) if isinstance(address, ServerAddress) else tuple(address)
        if not self.addresses:
            raise ValueError("a client needs a server address")
        self._at = 0  # the index of the address in use
        self._token = token
        self.state = state
        core.write_ahead = state is not None  # our commits go out once saved
        self._saving: asyncio.Task[None] | None = None  # the write-ahead of commits
        self._ca = ca_certificate
        self._reconnect = reconnect
        if reconnect_max_delay <= 0:  # (found here, not in the reconnect task)
            raise ValueError("reconnect_max_delay must be positive")
        # The reconnect backoff doubles from RECONNECT_FIRST_DELAY up to this (seconds).
        self.reconnect_max_delay = reconnect_max_delay
        self._sink: FrameSink | None = None
        self._current: _Session | None = None  # the session of the connection in use
        self._keepalive_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        # Requests outside the outbox, while unanswered: sent again if refused as rate limited.
        self._plain: dict[int, bytes] = {}
        self._deferred: list[bytes] = []  # those, waiting for the end of the pause
        self._wake: asyncio.TimerHandle | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self.messages: asyncio.Queue[ev.Message] = asyncio.Queue()
        self.events: asyncio.Queue[ev.Event] = asyncio.Queue()  # everything else, for apps
        self.joined = asyncio.Queue[bytes]()
        # Set whenever the core's window may have room again (an answer, a reconnect, the end
        # of a pause) or the connection or the client is gone: ``reserve`` waits on it.
        self._window_changed = asyncio.Event()

    @property
    def token(self) -> str:
        """The credential the next Hello uses: the device token, once a login code was
        exchanged for one."""
        return self._token

    # --- connection --------------------------------------------------------------------------

    @property
    def address(self) -> ServerAddress:
        """The address in use (or tried next)."""
        return self.addresses[self._at]

    async def connect(self) -> None:
        """Connect to the address in use; failing that, to each other one in turn (raising
        the last failure if none answers)."""
        for tried in range(len(self.addresses)):
            try:
                await asyncio.wait_for(self._open(), self.request_timeout)
                return
            except Exception as exc:
                if tried == len(self.addresses) - 1 or self._closing:
                    raise
                log.info("no session at %s (%s); trying the next", self.address, _why(exc))
                self._next_address()

    def _next_address(self) -> None:
        self._at = (self._at + 1) % len(self.addresses)

    async def _open(self) -> None:
        self._connected.clear()
        session = self._current = _Session(self._session_frame, self._session_lost)
        sink = await self._connector(self.address, lambda _sink: session, self._ca)
        self._sink = sink
        rid_frame = self.core.hello(self._token, now=self.clock())
        try:
            reply = await self._submit(Frame.decode(rid_frame).header.request_id, rid_frame)
            payload = decode_payload(Opcode.HELLO_REPLY, reply.payload)
            assert isinstance(payload, HelloReply)
            self.core.hello_reply(payload)
        except BaseException:
            # A connection without a session (no answer, a refusal): closed, not leaked; the
            # next attempt opens a new one.
            if self._current is session:
                self._current = None
                self._sink = None
            sink.close("hello failed")
            raise
        if payload.device_token:
            # A login code was redeemed (it works once): reconnect with this token from now on.
            self._token = payload.device_token
        self._connected.set()
        if self.keepalive is not None and self._keepalive_task is None:
            self._keepalive_task = asyncio.create_task(self._keepalive_loop())
        self._handle(self.core.resync_all(now=self.clock()))

    # Once the client has moved on from a connection (a dead one it dropped itself), that
    # connection's late events are ignored, so they cannot disturb the next connection.

    def _session_frame(self, session: _Session, frame: Frame) -> None:
        if self._current is session:
            self._frame_received(frame)

    def _session_lost(self, session: _Session, reason: str) -> None:
        if self._current is session:
            self._current = None
            self._connection_lost(reason)

    def _connection_lost(self, reason: str) -> None:
        was_connected = self._connected.is_set()
        self._sink = None
        self._connected.clear()
        self.core.connection_lost()
        self._window_changed.set()
        self._deferred.clear()  # their futures fail below
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        # Requests the outbox keeps (messages, commits, ...) stay pending: they are resent
        # after the reconnect's catch-up and resolve when the log shows them.
        for rid, future in list(self._futures.items()):
            if rid in self.core.outbox:
                continue
            del self._futures[rid]
            self._plain.pop(rid, None)
            if not future.done():
                future.set_exception(ClientError(f"connection lost: {reason}"))
        if self._closing:
            return
        if self._reconnect and self._reconnect_task is None:
            self._reconnect_task = asyncio.create_task(self._reconnect_loop(reason))
        elif not self._reconnect and was_connected:
            self.events.put_nowait(ev.Disconnected(reason))

    async def _reconnect_loop(self, reason: str) -> None:
        """Reconnect with exponential backoff (jittered, capped at ``reconnect_max_delay``),
        telling the application through ``events``: Disconnected before each wait, Reconnected
        once back. The (re)connect syncs every room from its last applied log index, so what
        was sent meanwhile arrives once, in log order."""
        cap = self.reconnect_max_delay
        backoff = Backoff(min(RECONNECT_FIRST_DELAY, cap), cap, jitter=RECONNECT_JITTER)
        attempt = 0
        try:
            while not self._closing:
                wait = min(backoff.next(), cap)  # (the jitter never goes past the cap)
                log.info(
                    "disconnected from %s (%s); reconnecting in %.1f s", self.address, reason, wait
                )
                self.events.put_nowait(ev.Disconnected(reason, attempt, wait))
                await asyncio.sleep(wait)
                if attempt == 0:
                    self._next_address()  # the process that dropped us may be gone: others first
                attempt += 1
                try:
                    await self.connect()
                except Exception as exc:  # whatever it was, keep trying (and say why)
                    reason = _why(exc)
                    continue
                if not self._connected.is_set():
                    # Lost again before this task resumed: its loss started no new loop.
                    reason = "connection lost right after connecting"
                    continue
                log.info("reconnected to %s", self.address)
                self.events.put_nowait(ev.Reconnected(attempt))
                return
        finally:
            self._reconnect_task = None

    async def _keepalive_loop(self) -> None:
        assert self.keepalive is not None
        while not self._closing:
            await asyncio.sleep(self.keepalive)
            session, sink = self._current, self._sink
            if sink is None or session is None or not self._connected.is_set():
                continue
            if self.core.resume_at(now=self.clock()) is not None:
                continue  # rate limited: the server answered just now, and would refuse a Ping
            self.maintain()
            rid, data = self.core.build_frame(Opcode.PING, b"", sign=False, now=self.clock())
            try:
                await asyncio.wait_for(self._submit(rid, data), self.keepalive)
            except ClientError:
                continue  # the connection was lost meanwhile; the reconnect loop has it
            except TimeoutError:
                if self._current is session and not self._closing:
                    log.info("no Pong from %s; dropping the connection", self.address)
                    self._current = None  # its late events are ignored from now on
                    self._connection_lost("keepalive timeout")
                    sink.close("keepalive timeout")

    async def close(self) -> None:
        self._closing = True
        self._window_changed.set()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        for task in (self._reconnect_task, self._keepalive_task, self._saving):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sink is not None:
            self._sink.close("client closing")
        if self.state is not None:
            self.state.save_all(self.core)

    async def window_changed(self) -> None:
        """Wait until the core's send window may have room again (an answer came, the
        connection came back, a pause ended), or the connection or the client went away.
        The caller looked at the window just before."""
        self._window_changed.clear()
        await self._window_changed.wait()

    async def wait_connected(self) -> None:
        await asyncio.wait_for(self._connected.wait(), self.request_timeout)

    # --- frames ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        sink, session = self._sink, self._current
        if sink is None:
            log.debug("not connected; the frame waits in the outbox for the next connect")
        elif not sink.send(data):
            # The transport's buffer is full: as the transport contract says, close. The
            # outbox goes out again after the reconnect, through the core's window.
            log.warning("send buffer to %s full; dropping the connection", self.address)
            if self._current is session:
                self._current = None
                self._connection_lost("send buffer full")
            sink.close("send buffer full")

    def _submit(self, request_id: int, data: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        if request_id in self.core.outbox:
            # The core sends it when its window admits it.
            self._handle(self.core.transmit(now=self.clock()))
        else:
            self._plain[request_id] = data
            self._send(data)
        return future

    def _frame_received(self, frame: Frame) -> None:
        if frame.header.opcode in _DIRECT_REPLIES:
            self._plain.pop(frame.header.request_id, None)
            future = self._futures.pop(frame.header.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame)
            return
        self._handle(self.core.receive(frame, now=self.clock()))

    def _wake_core(self) -> None:
        self._wake = None
        if self._connected.is_set():
            deferred, self._deferred = self._deferred, []
            for data in deferred:
                self._send(data)
            self._handle(self.core.transmit(now=self.clock()))

    def _schedule_wake(self) -> None:
        """Run the core's transmit again when its RATE_LIMITED pause is over."""
        now = self.clock()
        at = self.core.resume_at(now=now)
        if at is None or self._closing or self._wake is not None:
            return  # (a wake that comes too early finds the pause longer and schedules again)
        delay = max(0.0, at - now)
        self._wake = asyncio.get_running_loop().call_later(delay, self._wake_core)

    def _handle(self, events: list[ev.Event]) -> None:
        dirty: set[bytes | None] = set()
        for event in events:
            if isinstance(event, ev.Outgoing):
                self._send(event.frame)
            elif isinstance(event, ev.Message):
                self.messages.put_nowait(event)
            elif isinstance(event, ev.Acked):
                self._resolve(event.request_id, event.log_index)
            elif isinstance(event, ev.Failed):
                data = self._plain.get(event.request_id)
                if event.code == ErrorCode.RATE_LIMITED and data is not None:
                    self._deferred.append(data)  # not a failure: sent again after the pause
                    continue
                self._fail(event.request_id, ClientError(event.message, event.code))
                self.events.put_nowait(event)
            elif isinstance(event, ev.Reply):
                self._reply(event)
            elif isinstance(event, ev.StateChanged):
                dirty.add(event.room_id)
            else:
                if isinstance(event, ev.Joined):
                    self.joined.put_nowait(event.room_id)
                self.events.put_nowait(event)
        if self.state is not None and dirty:
            self.state.save(self.core, dirty)
        self._write_ahead()
        self._schedule_wake()
        self._window_changed.set()

    def _write_ahead(self) -> None:
        """Save the commits of ours that wait to be (their pending MLS state, with the outbox)
        and the send marks of our messages, then let them go out: a commit the server may have
        taken is always in saved state, and a message key used once is never used again."""
        if self.state is None or self._saving is not None or self._closing:
            return
        builds = {p.request_id: p.frame for p in self.core.outbox.values() if p.unsaved}
        if builds:
            self.state.save(self.core, ())
            self._saving = asyncio.create_task(self._saved(builds), name="client-write-ahead")

    async def _saved(self, builds: dict[int, bytes | None]) -> None:
        assert self.state is not None
        try:
            await self.state.durable()
        except Exception as exc:  # not saved: the commits wait, and saving is tried again
            log.warning("saving the client state failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(0.5)
            self._saving = None
            self._write_ahead()
            return
        self._saving = None
        for rid, frame in builds.items():
            pending = self.core.outbox.get(rid)
            if pending is not None and pending.frame is frame:  # (not rebuilt meanwhile)
                pending.unsaved = False
        self._handle(self.core.transmit(now=self.clock()))  # (and saves what was built meanwhile)

    def _resolve(self, request_id: int, value: Any) -> None:
        self._plain.pop(request_id, None)
        future = self._futures.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(value)

    def _fail(self, request_id: int, error: Exception) -> None:
        self._plain.pop(request_id, None)
        future = self._futures.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _reply(self, event: ev.Reply) -> None:
        frame = event.frame
        if frame.header.opcode == Opcode.ERROR:
            payload = decode_payload(Opcode.ERROR, frame.payload)
            assert isinstance(payload, ErrorPayload)
            self._fail(event.request_id, ClientError(payload.message, payload.code))
        else:
            self._resolve(event.request_id, frame)

    async def request(
        self, request_id: int, data: bytes, *, then: Callable[[], None] | None = None
    ) -> Any:
        """Send a frame built by the core (``request_id``, ``data``) and wait for its answer:
        the log index of a sequenced frame, or the answering frame; ClientError when the server
        refuses it, NotYetConfirmed when the outbox keeps it past ``request_timeout``.
        ``then``: work that must go out right after this frame."""
        future = self._submit(request_id, data)
        if then is not None:
            then()  # work that must go out right after this frame
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.request_timeout)
            except TimeoutError:
                # The timeout runs from the transmission: time spent queued on our side (the
                # send window, a RATE_LIMITED pause) does not count.
                if self.core.held(request_id, self.request_timeout, now=self.clock()):
                    continue
                if request_id in self.core.outbox:
                    # It resolves later (or fails) with nobody awaiting it any more.
                    future.add_done_callback(_consume)
                    raise NotYetConfirmed("queued; the server has not confirmed it yet") from None
                self._futures.pop(request_id, None)
                self._plain.pop(request_id, None)
                raise

    def send_unanswered(self, data: bytes) -> None:
        """Send a frame nothing answers (typing, presence): dropped when not connected."""
        self._send(data)

    async def request_in_window(self, request_id: int, data: bytes, cost: int) -> Frame:
        """``request`` for a frame the caller reserved ``cost`` bytes of the core's send window
        for (``core.reserve``); once answered, its place is released and frames the window
        held back go out. A new connection meanwhile started a fresh window: nothing to
        release then."""
        session = self._current
        try:
            reply: Frame = await self.request(request_id, data)
        finally:
            if self._current is session:
                self._handle(self.core.release(cost, now=self.clock()))
        return reply

    @property
    def closing(self) -> bool:
        """``close()`` was called: the client is going away."""
        return self._closing

    # --- operations ----------------------------------------------------------------------------

    async def create_room(self, name: str = "", topic: str = "") -> bytes:
        room_id, rid, data = self.core.create_room(name=name, topic=topic, now=self.clock())
        try:
            await self.request(rid, data)
        except BaseException:
            self.core.rooms.pop(room_id, None)
            raise
        if self.state is not None:
            self.state.save(self.core, {room_id})
        return room_id

    async def publish_key_packages(self, count: int = 5, *, last_resort: bool = True) -> int:
        """Publish ``count`` KeyPackages, and a last-resort one if we have none yet; returns
        how many (not counting the last-resort one) the server now holds for us."""
        stored = 0
        for kp in self.core.key_packages(count, last_resort=last_resort):
            rid, data = self.core.build_frame(Opcode.KEY_PACKAGE, kp, sign=False, now=self.clock())
            reply = await self.request(rid, data)
            stored = reply.header.context_id
        if self.state is not None:
            self.state.save(self.core, {None})
        return stored

    async def fetch_key_package(self, member_id: int) -> bytes:
        rid, data = self.core.build_frame(
            Opcode.KEY_PACKAGE, b"", context_id=member_id, sign=False, now=self.clock()
        )
        reply: Frame = await self.request(rid, data)
        return reply.payload

    async def invite(self, room_id: bytes, member_ids: list[int]) -> int:
        """Add members (their KeyPackages from the directory); returns the commit's log index."""
        packages = [await self.fetch_key_package(m) for m in member_ids]
        rid, data = self.core.add_members(room_id, packages, now=self.clock())
        return int(await self.request(rid, data))

    async def add(self, room_id: bytes, key_packages: list[bytes]) -> int:
        """Add members from these KeyPackages; returns the commit's log index."""
        rid, data = self.core.add_members(room_id, key_packages, now=self.clock())
        return int(await self.request(rid, data))

    async def remove(self, room_id: bytes, member_ids: list[int]) -> int:
        rid, data = self.core.remove_members(room_id, member_ids, now=self.clock())
        return int(await self.request(rid, data))

    async def self_update(self, room_id: bytes) -> int:
        rid, data = self.core.self_update(room_id, now=self.clock())
        return int(await self.request(rid, data))

    async def send_text(self, room_id: bytes, text: str) -> int:
        return await self.send(room_id, Content(body=text))

    async def send(
        self, room_id: bytes, content: Content, *, request_id: int | None = None
    ) -> int:
        """Send a message; returns its log index. ``request_id``: one reserved with
        ``core.next_request_id()`` and recorded by the caller before this call; sent again after a
        crash, the server answers with the message it sequenced under it, if any (at most one
        message per request id), and a request of the restored outbox is awaited, not doubled.
        """
        pending = self.core.outbox.get(request_id) if request_id is not None else None
        if pending is not None and pending.kind == "message" and pending.room_id == room_id:
            return int(await self.request(pending.request_id, pending.frame or b""))
        rid, data = self.core.send_message(
            room_id, content, request_id=request_id, now=self.clock()
        )
        # A self-update due after this message goes out behind it (post-compromise security).
        return int(await self.request(rid, data, then=self.maintain))

    async def upload_media(
        self,
        room_id: bytes,
        data: bytes | BinaryIO,
        *,
        mimetype: str = "application/octet-stream",
        name: str = "",
        kind: str = "file",
        width: int | None = None,
        height: int | None = None,
        duration_ms: int | None = None,
        key: bytes | None = None,
    ) -> MediaRef:
        """Encrypt and store a file in the room (see client/media.py); send the returned
        reference in a message: ``send(room, Content(body=name, kind=..., media=ref))``."""
        return await media.upload(
            self,
            room_id,
            data,
            mimetype=mimetype,
            name=name,
            kind=kind,
            width=width,
            height=height,
            duration_ms=duration_ms,
            key=key,
        )

    async def download_media(self, room_id: bytes, ref: MediaRef) -> bytes:
        """The file ``ref`` names, checked block by block (MediaError if anything differs)."""
        return await media.download(self, room_id, ref)

    def stream_media(self, room_id: bytes, ref: MediaRef) -> AsyncIterator[bytes]:
        """The file ``ref`` names, as checked plaintext blocks in order."""
        return media.stream(self, room_id, ref)

    async def delete_media(self, room_id: bytes, ref: MediaRef) -> int:
        """Drop the room's references to the file's blocks; returns how many were dropped."""
        return await media.delete(self, room_id, ref)

    def maintain(self) -> None:
        """Run the core's periodic duties now (also done on every keepalive tick)."""
        if self._connected.is_set():
            self._handle(self.core.maintenance(now=self.clock()))

    async def moderate(self, room_id: bytes, action: str, target: int, reason: str = "") -> int:
        rid, data = self.core.moderate(room_id, action, target, reason, now=self.clock())
        return int(await self.request(rid, data))

    async def leave(self, room_id: bytes) -> int:
        rid, data = self.core.leave(room_id, now=self.clock())
        return int(await self.request(rid, data))

    async def sync(self, room_id: bytes) -> None:
        """Catch up a room now and wait until the log is applied."""
        self._handle(self.core.open_room(room_id, now=self.clock()))
        await self.settle()

    async def settle(self) -> None:
        """Wait until no room is in the middle of a sync."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        while any(r.syncing or r.ahead for r in self.core.rooms.values() if r.active):
            if loop.time() > deadline:
                raise TimeoutError("rooms did not finish syncing")
            await asyncio.sleep(0.01)

    async def caught_up(self) -> None:
        """Wait until every room is caught up since the connection, or no sync is left in
        progress (a room whose sync the server refused stays behind until its next sync)."""
        core = self.core
        while core.catching_up and (core.sync_requests or core.sync_waiting):  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # (the sans-IO core has nothing to wait on)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.01)
