"""One client connection on the server: authentication, keepalive, limits, dispatch.

The asyncio driver of the session's sans-IO parts: its Hello/authentication state machine
(``hello.py``) and, through the hub, the rooms' sequencers.

Frames of one session are handled strictly in arrival order by the session's task (media
puts and gets that arrive together are stored or read together: ``cas.py``). Before a
room frame reaches its room's sequencer it must come from an authenticated session, name the
session's member as sender, carry that member's valid Ed25519 signature and fit the rate limit;
each failure is answered with an Error frame echoing the request id (never silence). Media
blocks (a CASPut or a CASGet of an authenticated session) have their own budget: each moves up
to 256 KiB, so a file of a few hundred blocks would spend the frame budget of messages.

Signatures are checked ahead of handling: frames are taken from the inbox in batches whose
signatures the verify pool checks (both cores: PyNaCl releases the GIL) while the loop handles
the batch before. The task exists only while the inbox has frames: an idle session holds no
task (10,000 idle sessions on one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Protocol

from nacl.signing import VerifyKey

from ..proto import (
    ErrorCode,
    Frame,
    FrameHeader,
    FrameRefused,
    Goodbye,
    HelloReply,
    Opcode,
    ProtocolError,
    ReadLimit,
    SkippedFrame,
    verify_header,
)
from ..proto.hello_proof import ReplayCache
from ..storage.base import StoreError
from ..transport.interface import FrameSink
from . import cas, replies
from .hello import BindKey, HelloAuth, IssueToken, LookUpToken, RedeemLoginCode, Refuse
from .ratelimit import Budget

log = logging.getLogger("kalandra.server.session")
_ids = itertools.count(1)

# Opcodes a session answers itself; everything else needs a room or a directory.
_SESSION_OPCODES = frozenset({Opcode.HELLO, Opcode.PING, Opcode.PONG, Opcode.GOODBYE})
# Reads and directory requests of an authenticated session need no frame signature.
_UNSIGNED_OK = frozenset({Opcode.SYNC_REQUEST, Opcode.KEY_PACKAGE}) | _SESSION_OPCODES
VERIFY_BATCH = 128
# Batches whose signatures are being checked ahead of the one being handled.
_AHEAD: Final = 4
# Media requests that wait in the session's cas.Batch; any other frame commits it first.
_BATCHED = frozenset({Opcode.CAS_PUT, Opcode.CAS_GET})
# Before Hello a connection may send only the session's own frames, each this small: any
# other header (a larger payload, another opcode) is refused before its payload is read, and
# the connection closed, so unauthenticated peers cannot make the server buffer anything.
PRE_HELLO_MAX_PAYLOAD: Final = 8 * 1024
_POOL: ThreadPoolExecutor | None = None


def _verify_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify")
    return _POOL


def _verify_many(headers: list[FrameHeader], key: VerifyKey) -> list[bool]:
    return [verify_header(h, key) for h in headers]


Verdicts = list[bool | None]  # per frame of a batch: signature valid, or None (decide later)


class HubFace(cas.Rooms, Protocol):
    """What a session needs of the hub (:class:`~.hub.Hub`, which creates the sessions): its
    clocks, limits and keys, the members' device keys, and where authenticated sessions and
    their room frames go."""

    monotonic: Callable[[], float]
    hello_replays: ReplayCache
    server_public_key: bytes
    bridge_bot: tuple[int, str] | None

    def session_gone(self, session: ServerSession) -> None: ...

    async def session_authenticated(self, session: ServerSession) -> None: ...

    async def signature_key(self, member_id: int) -> VerifyKey | None: ...

    async def bind_signature_key(self, member_id: int, offered: bytes | None) -> bool: ...

    def clock_skew_ms(self, hlc: int) -> int: ...

    async def dispatch(self, session: ServerSession, frame: Frame) -> None: ...


class ServerSession:
    def __init__(self, hub: HubFace, sink: FrameSink) -> None:
        self.hub = hub
        self.sink = sink
        self.session_id = next(_ids)
        self.member_id = 0
        self._auth = HelloAuth(hub.hello_replays)
        self.closed = False
        now = self.hub.monotonic()
        self.connected_at = now
        self.last_seen = now
        limits = hub.config.limits
        self._frames = Budget(limits.rate_per_second, limits.rate_burst, now)
        self._blocks = Budget(limits.media_rate_per_second, limits.media_rate_burst, now)
        # Authenticated: a payload over max_payload_size is skipped unread (QUOTA_EXCEEDED) and
        # the session goes on.
        self._read_limit = ReadLimit(limits.max_payload_size, None, skip_oversized=True)
        self._pre_hello_limit = ReadLimit(
            min(PRE_HELLO_MAX_PAYLOAD, limits.max_payload_size), _SESSION_OPCODES
        )
        self._inbox: list[Frame] = []  # (an empty deque takes 760 bytes; 10k sessions idle)
        self._task: asyncio.Task[None] | None = None  # runs while the inbox has frames
        self._key: VerifyKey | None = None  # the member's device key, once authenticated
        self._media = cas.Batch()  # media puts and gets admitted, stored or read together
        self._closed_waiter: asyncio.Future[None] | None = None  # made by wait_closed only

    @property
    def authenticated(self) -> bool:
        return self._auth.authenticated

    # --- transport side -------------------------------------------------------------------

    def frame_received(self, frame: Frame) -> None:
        self.last_seen = self.hub.monotonic()
        if self.closed:
            return
        self._inbox.append(frame)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"session-{self.session_id}")

    def read_limit(self) -> ReadLimit:
        """What the transport may read next (asked at each header, before its payload)."""
        return self._read_limit if self.authenticated else self._pre_hello_limit

    def protocol_error(self, error: ProtocolError) -> None:
        if isinstance(error, FrameRefused):
            # Refused on its header alone (before Hello): answered, then the connection closes.
            h = error.header
            if error.oversized:
                code, message = (
                    ErrorCode.QUOTA_EXCEEDED,
                    (
                        f"payload of {h.payload_size} bytes; before Hello this server takes "
                        f"{error.limit} at most"
                    ),
                )
            else:
                code, message = ErrorCode.NOT_AUTHORIZED, "send Hello with a device token first"
            self.send(replies.error(code, message, request_id=h.request_id, room_id=h.room_id))
            self.close("frame refused before Hello")
            return
        self.send(replies.error(ErrorCode.INVALID_PAYLOAD, f"framing lost: {error}"))
        self.close("protocol error")

    def connection_lost(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.hub.session_gone(self)
            self._wake_closed_waiter()

    def _wake_closed_waiter(self) -> None:
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    # --- output ----------------------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        if self.closed:
            return False
        if not self.sink.send(frame):
            log.warning("session %d: send buffer full, disconnecting", self.session_id)
            self.close("slow reader")
            return False
        return True

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.hub.session_gone(self)
            self.sink.close(reason)
            self._wake_closed_waiter()

    async def wait_closed(self) -> None:
        """Until the session is closed, the frames it received are handled and the media
        blocks it admitted are stored."""
        if not self.closed:
            if self._closed_waiter is None:
                self._closed_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._closed_waiter)
        while self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await cas.flush(self.hub, self, self._media)

    # --- processing ------------------------------------------------------------------------

    async def _run(self) -> None:
        """Handle the inbox in order until it is empty, checking each batch's signatures while
        the batch before it is handled. Frames received before the connection was lost are
        handled too (they were sent; only their answers are lost): what a server does with a
        client's frames does not depend on when it noticed the hang-up."""
        ahead: deque[tuple[list[Frame], Verdicts | asyncio.Future[Verdicts]]] = deque()
        try:
            while True:
                self._take_batches(ahead)
                if not ahead:
                    return
                batch, pending = ahead.popleft()
                verdicts = pending if isinstance(pending, list) else await pending
                self._take_batches(ahead)  # what came meanwhile is checked during this batch
                for frame, verdict in zip(batch, verdicts, strict=True):
                    if self._media and frame.header.opcode not in _BATCHED:
                        await cas.flush(self.hub, self, self._media)
                    await self._handle_safely(frame, verdict)
                # The puts go into a transaction that ends on its own (the next batch does not
                # wait for it); the gets are answered now.
                await cas.settle(self.hub, self, self._media)
        finally:
            self._task = None
            for _, pending in ahead:  # cancelled (server shutdown): the rest is dropped
                if isinstance(pending, asyncio.Future):
                    pending.cancel()
            if self.closed:
                self._inbox.clear()

    def _take_batches(
        self, ahead: deque[tuple[list[Frame], Verdicts | asyncio.Future[Verdicts]]]
    ) -> None:
        inbox = self._inbox
        while inbox and len(ahead) < _AHEAD:
            batch = inbox[:VERIFY_BATCH]
            del inbox[:VERIFY_BATCH]
            ahead.append((batch, self._verify(batch)))

    def _verify(self, batch: list[Frame]) -> Verdicts | asyncio.Future[Verdicts]:
        """Signature verdicts for the frames that will need one (None: decide later, as for
        frames behind a Hello in the same batch), at once or from the verify pool.

        PyNaCl releases the GIL while it verifies, so the pool's threads use both cores while
        the loop goes on sequencing: Ed25519 is the largest per-frame cost.
        """
        verdicts: Verdicts = [None] * len(batch)
        key = self._key if self.authenticated else None
        if key is None:
            return verdicts
        member = self.member_id
        todo = [
            i
            for i, f in enumerate(batch)
            if f.header.sender_id == member and f.header.opcode not in _UNSIGNED_OK
        ]
        if len(todo) < 4:  # not worth a thread hop
            for i in todo:
                verdicts[i] = verify_header(batch[i].header, key)
            return verdicts
        loop = asyncio.get_running_loop()
        halves = [todo[: len(todo) // 2], todo[len(todo) // 2 :]]
        futures = [
            loop.run_in_executor(
                _verify_pool(), _verify_many, [batch[i].header for i in part], key
            )
            for part in halves
        ]

        async def gathered() -> Verdicts:
            for part, future in zip(halves, futures, strict=True):
                for i, ok in zip(part, await future, strict=True):
                    verdicts[i] = ok
            return verdicts

        return asyncio.ensure_future(gathered())

    async def _handle_safely(self, frame: Frame, verdict: bool | None) -> None:
        try:
            await self._handle(frame, verdict)
        except Exception as exc:
            if type(exc) is StoreError:  # not a subclass: NotFound, AlreadyExists, ...
                # The database is unavailable (restarting, full): nothing wrong with the frame,
                # and the client may send it again (room appends answer the same, workers.py).
                log.warning("session %d: storage error (%s)", self.session_id, exc)
                self.reject(frame, ErrorCode.STORAGE_ERROR, "storage unavailable; retry")
                return
            log.exception("session %d: frame handling failed", self.session_id)
            h = frame.header
            self.send(
                replies.error(
                    ErrorCode.FRAME_REJECTED,
                    "internal error",
                    request_id=h.request_id,
                    room_id=h.room_id,
                )
            )

    def reject(self, frame: Frame, code: ErrorCode, message: str, **kw: int | None) -> None:
        h = frame.header
        self.send(replies.error(code, message, request_id=h.request_id, room_id=h.room_id, **kw))

    async def _handle(self, frame: Frame, verdict: bool | None = None) -> None:
        h = frame.header
        limits = self.hub.config.limits
        now = self.hub.monotonic()
        opcode = h.opcode
        blocks = opcode in _BATCHED and self._auth.authenticated
        retry_after = (self._blocks if blocks else self._frames).admit(now)
        if retry_after is not None:
            what = "media block rate" if blocks else "frame rate"
            self.reject(
                frame, ErrorCode.RATE_LIMITED, f"{what} limit exceeded", retry_after=retry_after
            )
            return
        if isinstance(frame, SkippedFrame) or h.payload_size > limits.max_payload_size:
            # The transport skipped its payload unread (loopback frames are checked here).
            self.reject(
                frame,
                ErrorCode.QUOTA_EXCEEDED,
                f"payload of {h.payload_size} bytes; this server takes "
                f"{limits.max_payload_size} at most",
            )
            return
        if opcode in _SESSION_OPCODES:
            await self._session_frame(frame)
            return
        if not self._auth.authenticated:
            self.reject(frame, ErrorCode.NOT_AUTHORIZED, "send Hello with a device token first")
            return
        if h.sender_id != self.member_id:
            self.reject(frame, ErrorCode.NOT_AUTHORIZED, "sender_id is not this session's member")
            return
        if opcode not in _UNSIGNED_OK:
            if verdict is None:
                key = await self.hub.signature_key(self.member_id)
                verdict = key is not None and verify_header(h, key)
            if not verdict:
                self.reject(frame, ErrorCode.INVALID_SIGNATURE, "invalid frame signature")
                return
            skew = self.hub.clock_skew_ms(h.hlc_timestamp)
            if skew > limits.max_clock_skew_ms:
                self.reject(frame, ErrorCode.FRAME_REJECTED, "hlc timestamp is in the future")
                return
        if opcode in cas.CAS_OPCODES:  # media blocks: answered here, never sequenced
            await cas.handle(self.hub, self, frame, self._media)
            return
        await self.hub.dispatch(self, frame)

    async def _session_frame(self, frame: Frame) -> None:
        h = frame.header
        if h.opcode == Opcode.PING:
            self.send(replies.reply(Opcode.PONG, b"", request_id=h.request_id))
        elif h.opcode == Opcode.PONG:
            pass
        elif h.opcode == Opcode.GOODBYE:
            self.send(
                replies.reply(Opcode.GOODBYE, Goodbye(reason="ack"), request_id=h.request_id)
            )
            self.close("peer goodbye")
        else:
            await self._hello(frame)

    async def _hello(self, frame: Frame) -> None:
        """Drive the session's HelloAuth (hello.py): perform each step it asks for."""
        h = frame.header
        store = self.hub.store
        now_ms = int(self.hub.clock() * 1000)
        step = self._auth.hello(frame.payload, h.hlc_timestamp, now_ms)
        try:
            while True:
                if isinstance(step, LookUpToken):
                    step = self._auth.member_found(await store.authenticate(step.token))
                elif isinstance(step, RedeemLoginCode):
                    found = await store.redeem_login_code(step.code, step.now_ms)
                    step = self._auth.member_found(found)
                elif isinstance(step, BindKey):
                    bound = await self.hub.bind_signature_key(step.member_id, step.key)
                    step = self._auth.key_bound(bound)
                elif isinstance(step, IssueToken):
                    step = self._auth.token_issued(await store.issue_token(step.member_id))
                else:
                    break
        except BaseException:
            self._auth.abandon()  # (a storage error is answered by the caller)
            raise
        if isinstance(step, Refuse):
            self.reject(frame, step.code, step.message)
            if step.close:
                self.close("authentication failed")
            return
        self.member_id = step.member_id
        self._key = await self.hub.signature_key(step.member_id)
        bridge = self.hub.bridge_bot
        self.send(
            replies.reply(
                Opcode.HELLO_REPLY,
                HelloReply(
                    session_id=self.session_id,
                    capabilities=["kalandra-bridge", "errors", "mailbox", "sync-epochs"],
                    member_id=step.member_id,
                    server_key=self.hub.server_public_key,
                    device_token=step.device_token,
                    bridge_member_id=bridge[0] if bridge else None,
                    bridge_mxid=bridge[1] if bridge else None,
                ),
                request_id=h.request_id,
            )
        )
        await self.hub.session_authenticated(self)
