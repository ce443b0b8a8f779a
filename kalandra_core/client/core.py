"""The native client, sans-IO: commands in, frames and events out; frames in, events out.

The epoch rules (docs/architecture.md, Epoch rules), as this core keeps them:

1. The epoch comes only from our MLS state; server replies never set it.
2. Every frame we send carries our MLS epoch; the server checks it.
3. StaleEpoch on a message: catch up from the log (sync from the last log index we applied),
   process the missing commits, re-encrypt and resend, up to 3 attempts, without surfacing an
   error. A commit of ours that lost the race is discarded and rebuilt on the new epoch.
4. Opening a room or reconnecting always syncs from the last applied log index.
5. Our own commit, echoed back by the sequencer, is merged, never reprocessed. A commit of
   ours is saved (its pending MLS state with the outbox) before it goes out (``write_ahead``),
   and kept in the saved outbox after it is merged until a saved room state includes it
   (``merged``): a room state saved before the commit, restored after a crash, merges it too.
6. Welcomes of a commit go out only after that commit is in the log.
7. A message key is used once: every encryption (the first, and each re-encryption after a
   StaleEpoch or a restart) goes past and records the send mark of its epoch, and the message
   goes out once the marks are saved (``send_marks.py``).

Room frames are applied strictly in log order: a frame that arrives early (QUIC delivers server
frames on independent streams) waits, and a gap triggers a sync.

Frames of the outbox go out through a send window (``window.py``): commands queue them, and
``transmit`` (also run at the end of every entry point that returns events) hands out what the
window admits, in the order of each room (``pacing.py``). RATE_LIMITED is not a failure: the
refused frame stays queued and goes out again after the pause the server named.

The class is in three modules: this one (identity, commands, frames in), ``recovery.py`` (sync
and epoch recovery) and ``pacing.py`` (what goes out now). It reads no clock: every entry point
that needs the time takes it as ``now`` (Unix seconds), so a driver or a simulation owns time.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable

from nacl.signing import SigningKey

from ..crypto import SenderKeyError
from ..mls.errors import InvalidMlsMessage, MlsError
from ..mls.group import MlsGroup
from ..mls.keypackage import KeyPackageBundle, build_key_package, bundle_is_last_resort
from ..mls.server_view import inspect_handshake
from ..mls.update_tracker import UpdatePolicy
from ..proto import (
    Ban,
    EncryptedMessage,
    Frame,
    FrameHeader,
    GroupInfoData,
    Handshake,
    HelloReply,
    Kick,
    Opcode,
    Payload,
    PayloadDecodeError,
    RawPayload,
    Redact,
    Unban,
    decode_payload,
    sign_header,
    verify_header,
)
from ..proto.hello_proof import signed_hello
from ..proto.hlc import HybridClock
from . import events as ev
from . import room_meta
from .content import Content
from .pacing import Pacing
from .recovery import SyncRecovery
from .room import NOT_COMMITS, ClientRoom, Pending
from .send_marks import SendMarks
from .window import DEFAULT_BYTES, DEFAULT_FRAMES, SendWindow

# Commits that carry an UpdatePath (fresh leaf keys).
_PATH_COMMITS = frozenset({"update", "remove", "proposals"})
SERVER_SENDER = 0
_REQUEST_SPACE = 1 << 31


class ClientCore(SyncRecovery, Pacing):
    """One member's client: its identity, rooms (MLS groups and sender keys), outbox and send
    window. Commands and frames in return events (``events.py``); ``Outgoing`` ones carry the
    frames to send."""

    def __init__(
        self,
        member_id: int,
        signing_key: bytes,
        *,
        handshake: Handshake = Handshake.PUBLIC,
        first_request_id: int | None = None,
        update_policy: UpdatePolicy = UpdatePolicy.STANDARD,
        window: int = DEFAULT_FRAMES,
        window_bytes: int = DEFAULT_BYTES,
    ) -> None:
        self.update_policy = update_policy
        self.window = SendWindow(window, window_bytes)
        self.connected = False  # between resync_all and connection_lost
        self.member_id = member_id
        self.signing_key = bytes(signing_key)
        self._signer = SigningKey(self.signing_key)
        self.handshake = handshake
        self.rooms: dict[bytes, ClientRoom] = {}
        self.bundles: dict[bytes, KeyPackageBundle] = {}  # KeyPackageRef -> bundle
        self.outbox: dict[int, Pending] = {}
        # Our commits merged from the log, by request id, kept until the saved state of their
        # room includes them (forget_merged); replayed after a restart, they merge again.
        self.merged: dict[int, Pending] = {}
        # With a state store: a commit goes out only once its build is saved (the driver
        # clears ``Pending.unsaved``). Without one there is nothing to wait for.
        self.write_ahead = False
        # The generations our encryptions used (send_marks.py): saved with the outbox, and
        # saved before a message goes out (the write-ahead covers messages too).
        self.send_marks = SendMarks()
        self.server_key: bytes | None = None
        self.bridge_member_id: int | None = None
        self.bridge_mxid: str | None = None
        self.session_id: int | None = None
        # Welcomes for rooms we still think we are in (we may have been removed meanwhile).
        self.parked_welcomes: dict[bytes, Frame] = {}
        self.sync_requests: dict[int, bytes] = {}  # request id -> room, to route sync errors
        # Rooms whose sync waits for its turn (recovery.py), the next first.
        self.sync_waiting: OrderedDict[bytes, None] = OrderedDict()
        # Rooms not caught up yet since the connection (each says CaughtUp when it is).
        self.catching_up: set[bytes] = set()
        # Members whose turn to commit a proposal this core takes: leaves it holds that never
        # process anything themselves (a bridge's puppet leaves). Shared, may grow.
        self.commit_for: set[int] = set()
        self._hlc = HybridClock()
        self._next_request = (
            secrets.randbelow(_REQUEST_SPACE) + 1 if first_request_id is None else first_request_id
        )

    # --- frames out ----------------------------------------------------------------------------

    def next_request_id(self) -> int:
        """A request id for a frame to build; a caller may reserve one and record it first,
        so that a resend after a crash carries the same id (``send_message``)."""
        rid = self._next_request
        self._next_request = rid + 1 if rid + 1 < (1 << 32) else 1
        return rid

    def build_frame(
        self,
        opcode: int,
        payload: Payload | bytes,
        *,
        now: float,
        room: ClientRoom | None = None,
        room_int: int = 0,
        context_id: int = 0,
        epoch: int | None = None,
        request_id: int | None = None,
        sign: bool = True,
        hlc: int | None = None,
    ) -> tuple[int, bytes]:
        """A frame from our member (request id, bytes), signed unless ``sign`` is False, at the
        room's epoch (or ``epoch``), stamped with our hybrid clock at ``now``."""
        rid = self.next_request_id() if request_id is None else request_id
        header = FrameHeader(
            opcode,
            request_id=rid,
            room_id=room.room_int if room is not None else room_int,
            sender_id=self.member_id,
            context_id=context_id,
            hlc_timestamp=self._hlc.tick(int(now * 1000)) if hlc is None else hlc,
            epoch=(room.epoch if room is not None else 0) if epoch is None else epoch,
        )
        frame = Frame.build(header, payload)
        if sign:
            sign_header(frame.header, self._signer)
        return rid, frame.encode()

    def hello(self, token: str, *, now: float) -> bytes:
        """The Hello frame: the token (or login code) and the proof that we hold our key, bound
        to this Hello's timestamp (the server refuses it again, or late)."""
        hlc = self._hlc.tick(int(now * 1000))
        hello = signed_hello(token.encode(), self._signer, hlc)
        return self.build_frame(Opcode.HELLO, hello, sign=False, hlc=hlc, now=now)[1]

    def hello_reply(self, reply: HelloReply) -> None:
        if self.member_id == 0 and reply.member_id:
            self.member_id = reply.member_id  # first login: the token names the account
        elif reply.member_id is not None and reply.member_id != self.member_id:
            raise ValueError("the server authenticated a different member than this state's")
        self.session_id = reply.session_id
        self.server_key = reply.server_key
        # The server's embedded bridge, if any (as trusted as the server's account directory).
        self.bridge_member_id = reply.bridge_member_id
        self.bridge_mxid = reply.bridge_mxid

    def load_pending(self, pending: Pending) -> None:
        """A request read back from saved state: the outbox, or a merged commit of ours."""
        if pending.log_index >= 0:
            self.merged[pending.request_id] = pending
        else:
            self.outbox[pending.request_id] = pending

    def forget_merged(self, room_id: bytes, last_seen: int) -> None:
        """A state of the room that has applied the log up to ``last_seen`` is saved (or about
        to be, in the same transaction as the outbox): our commits it includes are done."""
        for rid, pending in list(self.merged.items()):
            if pending.room_id == room_id and pending.log_index <= last_seen:
                del self.merged[rid]

    def resync_all(self, *, now: float) -> list[ev.Event]:
        """After (re)connecting: catch up every room from its last applied log index, then
        resend the outbox through the window."""
        out: list[ev.Event] = []
        self.connected = True
        for room in self.rooms.values():
            self.forget_merged(room.room_id, room.last_seen)
        self.window.reset()
        for pending in self.outbox.values():
            pending.sent_size = 0
            if pending.kind != "welcome":
                # Welcomes are not logged: resent as they are, until the server's receipt.
                pending.awaiting_sync = True  # sent before the drop? the log will tell
        self.sync_requests.clear()  # answers to those will never come
        self.sync_waiting.clear()
        self.catching_up = {r.room_id for r in self.rooms.values() if r.active}
        for room in self.rooms.values():
            if room.active:
                room.syncing = False
                out += self._sync(room, now, wanted=False)
        return out + self.transmit(now=now)

    def connection_lost(self) -> None:
        """The connection is gone: nothing is in flight any more (resync_all resends)."""
        self.connected = False
        self.window.reset()
        for pending in self.outbox.values():
            pending.sent_size = 0

    # --- commands --------------------------------------------------------------------------

    def create_room(
        self,
        *,
        now: float,
        name: str = "",
        topic: str = "",
        handshake: Handshake | None = None,
    ) -> tuple[bytes, int, bytes]:
        """A new room (room id, request id, GroupInfo frame); usable once the server acks it."""
        mode = handshake or self.handshake
        senders = [(self.server_key, 0)] if self.server_key else []
        group = MlsGroup.create(
            self.member_id, self.signing_key, external_senders=senders, handshake=mode
        )
        room_id = os.urandom(16)
        room = ClientRoom(room_id, group, last_seen=-1, policy=self.update_policy, now=now)
        room.anchored = True
        room.name, room.topic = name, topic
        self.rooms[room_id] = room
        payload = GroupInfoData(
            group_info=group.group_info(), handshake=mode.value, name=name, topic=topic
        )
        rid, data = self.build_frame(Opcode.GROUP_INFO, payload, room=room, now=now)
        return room_id, rid, data

    def key_packages(self, count: int, *, last_resort: bool = False) -> list[bytes]:
        """Fresh KeyPackages to publish; their private parts wait here for a Welcome. With
        ``last_resort``, one more flagged as the last-resort one unless we hold one already
        (the server hands it out, never consumed, once the others are gone). Their lifetime
        is real time, as every member and the server check it (mls/keypackage.py)."""
        out = []
        for _ in range(count):
            bundle = build_key_package(self.member_id, self.signing_key)
            self.bundles[bundle.ref] = bundle
            out.append(bundle.key_package)
        if last_resort and not any(bundle_is_last_resort(b) for b in self.bundles.values()):
            bundle = build_key_package(self.member_id, self.signing_key, last_resort=True)
            self.bundles[bundle.ref] = bundle
            out.append(bundle.key_package)
        return out

    def send_message(
        self, room_id: bytes, content: Content, *, now: float, request_id: int | None = None
    ) -> tuple[int, bytes]:
        """``request_id``: one the caller reserved (``next_request_id``) and recorded, so that
        a resend after a crash is recognised by the server as the same request."""
        room = self.active_room(room_id)
        rid = self.next_request_id() if request_id is None else request_id
        pending = Pending(rid, room_id, "message", plaintext=content.encode())
        self.outbox[rid] = pending
        room.updates.message_sent()
        # Encrypted now (the send chain's generations follow the calls); queued for transmit.
        return rid, self._encrypt(room, pending, now)

    def maintenance(self, *, now: float) -> list[ev.Event]:
        """Periodic duties: a self-update commit for each room whose leaf is due for fresh keys
        (post-compromise security), unless a commit of ours is already on its way."""
        busy = {p.room_id for p in self.outbox.values() if p.kind not in NOT_COMMITS}
        for room in self.rooms.values():
            if (
                room.active
                and room.anchored
                and not room.syncing
                and room.room_id not in busy
                and not room.group.has_pending_commit
                and room.updates.due(now)
            ):
                self._commit(Pending(self.next_request_id(), room.room_id, "update"), now)
        return self.transmit(now=now)

    def _encrypt(self, room: ClientRoom, pending: Pending, now: float) -> bytes:
        assert pending.plaintext is not None
        envelope = self.send_marks.encrypt(room.room_id, room.keys, pending.plaintext)
        pending.epoch = room.epoch
        pending.frame = self.build_frame(
            Opcode.APP_MESSAGE, envelope, room=room, request_id=pending.request_id, now=now
        )[1]
        pending.unsaved = self.write_ahead  # out once its send mark is saved
        return pending.frame

    def add_members(
        self, room_id: bytes, key_packages: list[bytes], *, now: float
    ) -> tuple[int, bytes]:
        rid = self.next_request_id()
        pending = Pending(rid, room_id, "add", key_packages=list(key_packages))
        return rid, self._commit(pending, now)

    def remove_members(
        self, room_id: bytes, member_ids: Iterable[int], *, now: float
    ) -> tuple[int, bytes]:
        rid = self.next_request_id()
        pending = Pending(rid, room_id, "remove", member_ids=list(member_ids))
        return rid, self._commit(pending, now)

    def self_update(self, room_id: bytes, *, now: float) -> tuple[int, bytes]:
        rid = self.next_request_id()
        return rid, self._commit(Pending(rid, room_id, "update"), now)

    def _commit(self, pending: Pending, now: float) -> bytes:
        room = self.active_room(pending.room_id)
        group = room.group
        if pending.kind == "add":
            out = group.add(pending.key_packages)
        elif pending.kind == "remove":
            out = group.remove(pending.member_ids)
        elif pending.kind == "proposals":
            out = group.commit_pending_proposals()
        else:
            out = group.self_update()
        pending.welcomes = dict(out.welcomes)
        pending.epoch = room.epoch
        pending.mls = group.pending_commit()
        pending.unsaved = self.write_ahead
        self.outbox[pending.request_id] = pending
        pending.frame = self.build_frame(
            Opcode.COMMIT,
            RawPayload(out.commit),
            room=room,
            request_id=pending.request_id,
            now=now,
        )[1]
        return pending.frame

    def leave(self, room_id: bytes, *, now: float) -> tuple[int, bytes]:
        room = self.active_room(room_id)
        rid = self.next_request_id()
        pending = self.outbox[rid] = Pending(rid, room_id, "leave", epoch=room.epoch)
        proposal = RawPayload(room.group.propose_leave())
        pending.frame = self.build_frame(
            Opcode.PROPOSAL, proposal, room=room, request_id=rid, now=now
        )[1]
        return rid, pending.frame

    def moderate(
        self, room_id: bytes, action: str, target: int, reason: str = "", *, now: float
    ) -> tuple[int, bytes]:
        """Kick, ban, unban a member, or redact (``target`` = the log index)."""
        room = self.active_room(room_id)
        payload: Payload
        if action == "kick":
            payload = Kick(user_id=target, reason=reason, moderator_id=self.member_id)
            opcode = Opcode.KICK
        elif action == "ban":
            payload = Ban(user_id=target, reason=reason, moderator_id=self.member_id)
            opcode = Opcode.BAN
        elif action == "unban":
            payload = Unban(user_id=target, moderator_id=self.member_id)
            opcode = Opcode.UNBAN
        elif action == "redact":
            payload = Redact(message_log_index=target, reason=reason, moderator_id=self.member_id)
            opcode = Opcode.REDACT
        else:
            raise ValueError(f"unknown moderation action {action!r}")
        rid = self.next_request_id()
        pending = self.outbox[rid] = Pending(rid, room_id, "moderation", epoch=room.epoch)
        pending.frame = self.build_frame(opcode, payload, room=room, request_id=rid, now=now)[1]
        return rid, pending.frame

    def active_room(self, room_id: bytes) -> ClientRoom:
        """The room, if we are an active member of it (KeyError otherwise)."""
        room = self.rooms.get(room_id)
        if room is None or not room.active:
            raise KeyError(f"not in room {room_id.hex()}")
        return room

    # --- frames in ---------------------------------------------------------------------------

    def receive(self, frame: Frame, *, now: float) -> list[ev.Event]:
        return self._receive(frame, now) + self.transmit(now=now)

    def _receive(self, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        opcode = h.opcode
        room = self.rooms.get(h.room_id_bytes) if h.room_id else None
        if opcode == Opcode.ERROR:
            return self._error(frame, now)
        if opcode == Opcode.SYNC_RESPONSE:
            return self._sync_response(frame, room, now)
        if opcode == Opcode.WELCOME:
            pending = self.outbox.get(h.request_id)
            if not frame.payload and pending is not None and pending.kind == "welcome":
                # The server's receipt: the Welcome is in the recipient's mailbox.
                self._answered(self.outbox.pop(h.request_id))
                return [ev.Acked(h.request_id, pending.room_id, None)]
            return self._welcome(frame, now)
        if opcode in (Opcode.KEY_PACKAGE, Opcode.GROUP_INFO, Opcode.HELLO_REPLY, Opcode.PONG):
            out: list[ev.Event] = [ev.Reply(h.request_id, frame)]
            if opcode == Opcode.GROUP_INFO and room is not None:
                out.append(ev.StateChanged(room.room_id))
            return out
        if opcode in (Opcode.TYPING, Opcode.PRESENCE) or room is None:
            return []
        return self._ordered(room, frame, now)

    def _ordered(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        index = frame.header.context_id
        h = frame.header
        if index <= room.last_seen and h.sender_id == self.member_id and room.active:
            # The server's answer to a resend of a request it had sequenced (a message resent
            # after a restart under its recorded request id): the stored frame, applied already.
            pending = self.outbox.get(h.request_id)
            if (
                pending is not None
                and pending.kind == "message"
                and pending.room_id == room.room_id
            ):
                self._answered(self.outbox.pop(h.request_id))
                return [ev.Acked(h.request_id, room.room_id, index)]
        if index <= room.last_seen or not room.active:
            return []  # already applied (a duplicate, or an echo we synced first)
        if not room.anchored or index != room.last_seen + 1:
            room.ahead[index] = frame
            return self._sync(room, now)
        out = self._apply(room, frame, now)
        while room.active and room.last_seen + 1 in room.ahead:
            out += self._apply(room, room.ahead.pop(room.last_seen + 1), now)
        room.ahead = {i: f for i, f in room.ahead.items() if i > room.last_seen}
        return out

    def _apply(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        room.last_seen = h.context_id
        out: list[ev.Event] = [ev.StateChanged(room.room_id)]
        pending = self.outbox.pop(h.request_id, None) if h.sender_id == self.member_id else None
        replayed = None
        if pending is not None:
            self._answered(pending)
            out.append(ev.Acked(h.request_id, room.room_id, h.context_id))
        elif h.sender_id == self.member_id:
            # A commit of ours merged before a restart, met again by a state saved before it.
            replayed = self.merged.get(h.request_id)
        opcode = h.opcode
        try:
            if opcode == Opcode.APP_MESSAGE:
                out += self._app_message(room, frame, now)
            elif opcode == Opcode.COMMIT and replayed is not None:
                out += self._commit_frame(room, frame, replayed, now, replayed=True)
            elif opcode == Opcode.COMMIT:
                out += self._commit_frame(room, frame, pending, now)
            elif opcode == Opcode.PROPOSAL:
                out += self._proposal_frame(room, frame, now)
            elif opcode in (Opcode.KICK, Opcode.BAN, Opcode.UNBAN, Opcode.REDACT):
                out += self._moderation_frame(room, frame, now)
        except (MlsError, SenderKeyError, PayloadDecodeError) as exc:
            out.append(ev.Undecryptable(room.room_id, h.context_id, h.sender_id, str(exc)))
        return out

    def _app_message(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        envelope = decode_payload(Opcode.APP_MESSAGE, frame.payload)
        assert isinstance(envelope, EncryptedMessage)
        leaf_and_key = room.roster().get(h.sender_id)
        if leaf_and_key is None or leaf_and_key[0] != envelope.sender_index:
            raise InvalidMlsMessage("sender is not the member at the envelope's leaf")
        if not verify_header(h, leaf_and_key[1]):
            raise InvalidMlsMessage("frame signature does not verify")
        if h.epoch != envelope.epoch:
            raise InvalidMlsMessage("frame and envelope epochs differ")
        plaintext = room.keys.decrypt(envelope)
        if h.hlc_timestamp:
            self._hlc.observe(h.hlc_timestamp, int(now * 1000))
        stamp = (h.hlc_timestamp >> 22) if h.hlc_timestamp else int(now * 1000)
        message = ev.Message(
            room.room_id, h.sender_id, h.context_id, stamp, Content.decode(plaintext)
        )
        return [room_meta.applied(room, message) or message]

    def _commit_frame(
        self,
        room: ClientRoom,
        frame: Frame,
        pending: Pending | None,
        now: float,
        *,
        replayed: bool = False,
    ) -> list[ev.Event]:
        if pending is not None:
            # Our saved room state may predate this commit of ours (saved before it was made,
            # a crash since): take its pending state back, so it is merged, not reprocessed.
            self._resume(room, pending)
        result = room.group.process(frame.payload)
        out: list[ev.Event] = []
        if result.removed_self:
            return self._leave(room, "removed from the group", now)
        room.epoch_moved()
        out.append(
            ev.EpochChanged(
                room.room_id,
                room.epoch,
                result.added,
                result.removed,
                log_index=frame.header.context_id,
                tree_hash=room.group.tree_hash,
                members=tuple(sorted(room.roster())),
                cipher_suite=room.group.suite,
            )
        )
        if result.kind == "own_commit" and pending is not None and pending.kind in _PATH_COMMITS:
            room.updates.leaf_updated(now)  # our leaf got a fresh HPKE key
        if pending is not None and result.kind == "own_commit":
            pending.log_index = frame.header.context_id
            if self.write_ahead:
                self.merged[pending.request_id] = pending  # until a saved room state has it
        if pending is not None and result.kind == "own_commit" and not replayed:
            # Rule 6. Each Welcome stays in the outbox until the server confirms it is in the
            # recipient's mailbox (a connection lost meanwhile would lose it for good).
            for recipient, welcome in pending.welcomes.items():
                rid = self.next_request_id()
                sent = Pending(rid, room.room_id, "welcome", welcomes={recipient: welcome})
                self.outbox[rid] = sent
                self._welcome_frame(room, sent, now)
        return out

    def _welcome_frame(self, room: ClientRoom, pending: Pending, now: float) -> bytes:
        """A Welcome of ours (resent unchanged: its epoch is the one its commit created)."""
        ((recipient, welcome),) = pending.welcomes.items()
        if pending.epoch < 0:
            pending.epoch = room.epoch
        pending.frame = self.build_frame(
            Opcode.WELCOME,
            RawPayload(welcome),
            room=room,
            context_id=recipient,
            epoch=pending.epoch,
            request_id=pending.request_id,
            now=now,
        )[1]
        return pending.frame

    def _proposal_frame(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        room.group.process(frame.payload)
        # Someone must commit it: the active member with the smallest id that is not leaving
        # (nor removed by it: a kicked member has stopped following the room).
        leaving = {self.member_id} if frame.header.sender_id == self.member_id else set()
        removed = _removed_member(room, frame.payload)
        if removed is not None:
            leaving.add(removed)
        candidates = [m for m in room.roster() if m not in leaving]
        if frame.header.sender_id != SERVER_SENDER and frame.header.sender_id in candidates:
            candidates.remove(frame.header.sender_id)
        ours = bool(candidates) and (
            min(candidates) == self.member_id or min(candidates) in self.commit_for
        )
        if ours and not room.group.has_pending_commit:
            self._commit(Pending(self.next_request_id(), room.room_id, "proposals"), now)
        return []

    def _moderation_frame(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        payload = decode_payload(h.opcode, frame.payload)
        if isinstance(payload, Redact):
            return [
                ev.Moderated(
                    room.room_id,
                    h.context_id,
                    "redact",
                    h.sender_id,
                    payload.message_log_index,
                    payload.reason,
                )
            ]
        assert isinstance(payload, Kick | Ban | Unban)
        action = {Opcode.KICK: "kick", Opcode.BAN: "ban", Opcode.UNBAN: "unban"}[Opcode(h.opcode)]
        reason = "" if isinstance(payload, Unban) else payload.reason
        out: list[ev.Event] = [
            ev.Moderated(room.room_id, h.context_id, action, h.sender_id, payload.user_id, reason)
        ]
        if payload.user_id == self.member_id and action in ("kick", "ban"):
            out += self._leave(room, f"{action}ed by {h.sender_id}: {reason}", now)
        return out

    def _leave(
        self, room: ClientRoom, reason: str, now: float, *, unseen: bool = False
    ) -> list[ev.Event]:
        """We are out of the room: fail what still waits for it, then take a Welcome that
        arrived for it meanwhile (removed and re-added while we were away).

        ``unseen``: the server refused to show us the log, so a commit of ours may have been
        sequenced before our removal without our seeing it. Its Welcomes are sent anyway: the
        server takes them only if that commit created their epoch (otherwise the joiners could
        never join)."""
        room.active = False
        room.syncing = False
        self.sync_waiting.pop(room.room_id, None)
        self.catching_up.discard(room.room_id)
        out: list[ev.Event] = [ev.Left(room.room_id, reason), ev.StateChanged(room.room_id)]
        for rid, pending in list(self.outbox.items()):
            if pending.room_id == room.room_id and pending.kind != "welcome":
                # (Welcomes of our logged commits are still ours to deliver.)
                self._answered(self.outbox.pop(rid))
                out.append(ev.Failed(rid, room.room_id, 0, f"left the room: {reason}"))
                if unseen and pending.frame is not None and pending.epoch >= 0:
                    for recipient, welcome in pending.welcomes.items():
                        sent = Pending(
                            self.next_request_id(),
                            room.room_id,
                            "welcome",
                            welcomes={recipient: welcome},
                            epoch=pending.epoch + 1,
                        )
                        self.outbox[sent.request_id] = sent
                        self._welcome_frame(room, sent, now)
        parked = self.parked_welcomes.pop(room.room_id, None)
        if parked is not None:
            out += self._welcome(parked, now)
        return out

    def _welcome(self, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        room_id = h.room_id_bytes
        if h.context_id != self.member_id:
            return []
        current = self.rooms.get(room_id)
        if current is not None and not current.active and h.epoch <= current.epoch:
            return []  # the Welcome we once joined with, again: a re-add has a newer epoch
        if current is not None and current.active:
            # Still a member as far as we know: either a repeat delivery of the Welcome we
            # joined with, or we were removed and re-added while away. Catch up; if the log
            # shows our removal, the kept Welcome is used then.
            if frame.header.epoch > current.epoch:
                parked = self.parked_welcomes.get(room_id)
                if parked is None or frame.header.epoch > parked.header.epoch:
                    self.parked_welcomes[room_id] = frame  # the newest re-add is the one
                return self._sync(current, now)
            return []
        group = None
        for ref, bundle in list(self.bundles.items()):
            try:
                group = MlsGroup.join(frame.payload, bundle, handshake=self.handshake)
            except InvalidMlsMessage:
                continue
            if not bundle_is_last_resort(bundle):
                del self.bundles[ref]  # a KeyPackage is single-use, but the last-resort one
            break
        if group is None:
            return [
                ev.Undecryptable(room_id, -1, h.sender_id, "Welcome for none of our KeyPackages")
            ]
        room = ClientRoom(room_id, group, last_seen=-1, policy=self.update_policy, now=now)
        room.anchored = False
        self.rooms[room_id] = room
        return [
            ev.StateChanged(None),
            ev.StateChanged(room_id),
            ev.Joined(room_id, room.epoch),
            *self._sync(room, now),
        ]


def _removed_member(room: ClientRoom, proposal: bytes) -> int | None:
    """The member a Remove proposal removes (None: another proposal, or not readable)."""
    try:
        leaf = inspect_handshake(proposal).proposal_remove
    except InvalidMlsMessage:
        return None
    return None if leaf is None else room.member_at(leaf)
