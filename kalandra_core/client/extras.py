"""Reactions, receipts and typing: what a client sends and reads besides messages.

AppReaction and AppReceipt are logged (the sequencer numbers them like messages) but not
encrypted: their payloads are the wire's ``Reaction``/``Receipt`` structs. Typing is ephemeral
(delivered to the room's sessions, never stored); the wire defines the opcode without a
payload, so ours is a small CBOR map ``{"typing": bool, "timeout_ms": uint}``. Edits are not
here: the wire's AppEdit has no payload (the server refuses it), and an edit must be as private
as the message it replaces, so it travels as an encrypted AppMessage whose content names the
edited message (``edit_of``, content.py).

:class:`ExtendedCore` is the client core that also reports these frames (``Reacted``,
``Receipted`` and ``Typing`` events; a plain ``ClientCore`` applies the logged ones silently
and drops typing). The send helpers send a frame once, built at the room's epoch, outside the
outbox (nothing of the group's pending state is involved): its echo from the log answers it
(``Acked``); a refusal (a stale epoch, say) or a lost connection fails it, and the caller may
send it again. Reactions and receipts are idempotent enough for that: a receipt only moves a
read position, and a reaction repeated is the same reaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cbor2

from ..proto import (
    Frame,
    Opcode,
    PayloadDecodeError,
    Reaction,
    Receipt,
    ReceiptKind,
    decode_payload,
    verify_header,
)
from . import events as ev
from .core import ClientCore
from .room import ClientRoom

if TYPE_CHECKING:
    from .driver import Client

TYPING_TIMEOUT_MS = 30_000  # how long "typing" holds without a renewal
_MAX_TIMEOUT_MS = 120_000


# --- frames ---------------------------------------------------------------------------------


def reaction_frame(
    core: ClientCore,
    *,
    room_int: int,
    epoch: int,
    target: int,
    key: str,
    add: bool,
    now: float,
) -> tuple[int, bytes]:
    """An AppReaction signed by ``core``'s member (request id, frame bytes)."""
    payload = Reaction(message_log_index=target, content=key, add=add)
    return core.build_frame(Opcode.APP_REACTION, payload, room_int=room_int, epoch=epoch, now=now)


def receipt_frame(
    core: ClientCore,
    *,
    room_int: int,
    epoch: int,
    target: int,
    kind: ReceiptKind = ReceiptKind.READ,
    now: float,
) -> tuple[int, bytes]:
    """An AppReceipt stamped ``now`` (Unix seconds; the receipt's timestamp is in ms)."""
    payload = Receipt(message_log_index=target, kind=kind, timestamp=int(now * 1000))
    return core.build_frame(Opcode.APP_RECEIPT, payload, room_int=room_int, epoch=epoch, now=now)


def typing_frame(
    core: ClientCore, *, room_int: int, epoch: int, typing: bool, timeout_ms: int, now: float
) -> tuple[int, bytes]:
    payload = cbor2.dumps({"typing": typing, "timeout_ms": timeout_ms if typing else 0})
    return core.build_frame(Opcode.TYPING, payload, room_int=room_int, epoch=epoch, now=now)


def read_typing(data: bytes) -> tuple[bool, int] | None:
    """(typing, timeout ms) of a Typing payload; None if it is not ours. An empty payload
    (a client that sends the bare opcode) means "typing" for the default time."""
    if not data:
        return True, TYPING_TIMEOUT_MS
    try:
        obj = cbor2.loads(data)
    except Exception:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("typing", True), bool):
        return None
    typing = bool(obj.get("typing", True))
    timeout = obj.get("timeout_ms")
    if not isinstance(timeout, int) or timeout <= 0:
        timeout = TYPING_TIMEOUT_MS
    return typing, min(timeout, _MAX_TIMEOUT_MS) if typing else 0


# --- the core that reports them -------------------------------------------------------------


def _signed_by_member(room: ClientRoom, frame: Frame) -> bool:
    entry = room.roster().get(frame.header.sender_id)
    return entry is not None and verify_header(frame.header, entry[1])


class ExtendedCore(ClientCore):
    """A ClientCore that reports reactions, receipts and typing to its application."""

    def _receive(self, frame: Frame, now: float) -> list[ev.Event]:
        h = frame.header
        if h.opcode != Opcode.TYPING:
            return super()._receive(frame, now)
        room = self.rooms.get(h.room_id_bytes) if h.room_id else None
        state = read_typing(frame.payload)
        if room is None or not room.active or state is None or not _signed_by_member(room, frame):
            return []
        return [ev.Typing(room.room_id, h.sender_id, state[0], state[1])]

    def _apply(self, room: ClientRoom, frame: Frame, now: float) -> list[ev.Event]:
        out = super()._apply(room, frame, now)
        h = frame.header
        if h.opcode not in (Opcode.APP_REACTION, Opcode.APP_RECEIPT):
            return out
        try:
            payload = decode_payload(h.opcode, frame.payload)
        except PayloadDecodeError as exc:
            return [*out, ev.Undecryptable(room.room_id, h.context_id, h.sender_id, str(exc))]
        if not _signed_by_member(room, frame):
            reason = "frame signature does not verify"
            return [*out, ev.Undecryptable(room.room_id, h.context_id, h.sender_id, reason)]
        if h.sender_id == self.member_id and not any(isinstance(e, ev.Acked) for e in out):
            # Ours, sent by the helpers below (outside the outbox): the echo answers it.
            out.append(ev.Acked(h.request_id, room.room_id, h.context_id))
        if isinstance(payload, Reaction):
            out.append(
                ev.Reacted(
                    room.room_id,
                    h.sender_id,
                    h.context_id,
                    payload.message_log_index,
                    payload.content,
                    payload.add,
                )
            )
        elif isinstance(payload, Receipt):
            out.append(
                ev.Receipted(
                    room.room_id,
                    h.sender_id,
                    h.context_id,
                    payload.message_log_index,
                    payload.kind.value,
                    payload.timestamp,
                )
            )
        return out


# --- sending through a Client ---------------------------------------------------------------


async def react(client: Client, room_id: bytes, target: int, key: str, add: bool = True) -> int:
    """React with ``key`` to the message at log index ``target`` (or take the reaction off);
    returns the reaction's log index."""
    room = client.core.active_room(room_id)
    rid, data = reaction_frame(
        client.core,
        room_int=room.room_int,
        epoch=room.epoch,
        target=target,
        key=key,
        add=add,
        now=client.clock(),
    )
    return int(await client.request(rid, data))


async def send_receipt(
    client: Client, room_id: bytes, target: int, kind: ReceiptKind = ReceiptKind.READ
) -> int:
    """A receipt (Read by default) up to the message at log index ``target``; returns its log
    index."""
    room = client.core.active_room(room_id)
    rid, data = receipt_frame(
        client.core,
        room_int=room.room_int,
        epoch=room.epoch,
        target=target,
        kind=kind,
        now=client.clock(),
    )
    return int(await client.request(rid, data))


async def mark_read(client: Client, room_id: bytes, target: int) -> int:
    return await send_receipt(client, room_id, target)


def set_typing(
    client: Client, room_id: bytes, typing: bool, timeout_ms: int = TYPING_TIMEOUT_MS
) -> None:
    """Tell the room's other sessions we are typing (or stopped); nothing is stored, nothing
    answers (dropped when not connected)."""
    room = client.core.active_room(room_id)
    _, data = typing_frame(
        client.core,
        room_int=room.room_int,
        epoch=room.epoch,
        typing=typing,
        timeout_ms=timeout_ms,
        now=client.clock(),
    )
    client.send_unanswered(data)
