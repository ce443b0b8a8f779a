"""Replies, edits, mentions and reactions across the bridge, through the message map.

A Kalandra message points at another by its log index (``reply_to``, ``edit_of``; content.py);
a Matrix event points at another by event id (``m.in_reply_to``, ``m.replace``). Both sides of
every bridged message are in bridge_messages (db/message.py), so each pointer is translated
there; one that names a message the bridge never saw is dropped (the message still goes, as a
plain one). A relation to a message that waits for its room key (encryption/e2ee.py) is held until
that message is bridged.

Mentions: a Kalandra message lists the member ids it mentions in its content (``"mentions":
[ids]``, kept by Content.extra); in Matrix they are ``m.mentions`` and pills. Toward Matrix each
member becomes its ghost (or, for a bridged Matrix user, that user), and its name in the text
becomes a pill; toward Kalandra the pills and ``m.mentions`` of ghosts and bridged users become
member ids.

Reactions are logged AppReaction frames, not encrypted. Toward Matrix the ghost sends an
``m.reaction`` (transaction id from the log index) recorded in the message map like a message;
a removal redacts the ghost's reaction, found through Synapse's relations of the message.
Toward Kalandra a Matrix user's reaction goes out as their puppet leaf's AppReaction, recorded
the same way, and the redaction of that reaction as the same member's AppReaction with ``add``
false (the frame's key and target read back from the log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mautrix.api import HTTPAPI, Method, Path
from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError
from mautrix.types import (
    BaseMessageEventContent,
    EventID,
    EventType,
    Format,
    MessageEventContent,
    MessageStatusReason,
    ReactionEventContent,
    RelatesTo,
    RelationType,
    RoomID,
    TextMessageEventContent,
    UserID,
)

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.extras import reaction_frame
from kalandra_core.proto import Frame, Opcode, Reaction, decode_payload

from ..db import BridgedUserTable, MessageTable
from ..db.progress import bridged_mxid
from ..encryption import e2ee
from ..members.puppet import member_of
from .statuses import Refused

if TYPE_CHECKING:
    from ..context import BridgeContext, BridgedMember, PortalFace
    from ..portal_work import FromMatrix

log = logging.getLogger("kalandra.bridge.relations")

MENTIONS = "mentions"  # the content key of the mentioned member ids
REACTION_REFUSAL = "reactions need the `user` permission (they cannot be relayed)."
_PILL = re.compile(r"""href=["']https://matrix\.to/#/(@[^"'/?]+)["']""")
_RECORD_WAIT, _RECORD_WAITS = 0.2, 50  # for a Matrix message's record (see matrix_event)

# (core, room as an int, epoch) -> (request id, signed frame)
FrameBuilder = Callable[[ClientCore, int, int], tuple[int, bytes]]


# --- Kalandra -> Matrix ---------------------------------------------------------------------


async def decorate(
    portal: PortalFace, content: Content, out: TextMessageEventContent
) -> TextMessageEventContent:
    """Add the reply, edit and mentions of a Kalandra message to its Matrix content."""
    mentions = await _mention_pills(portal, content)
    if mentions:
        out["m.mentions"] = {"user_ids": [mxid for mxid, _, _ in mentions]}
        if not out.formatted_body:  # pills only into text we wrote ourselves
            out.format = Format.HTML
            out.formatted_body = _with_pills(out.body, mentions)
    if content.edit_of is not None:
        target = await matrix_event(portal, content.edit_of)
        if target is not None:
            out.set_edit(target)
            return out  # an edit cannot change what the message replies to
    if content.reply_to is not None:
        target = await matrix_event(portal, content.reply_to)
        if target is not None:
            out.set_reply(target)
    return out


async def matrix_event(portal: PortalFace, log_index: int) -> EventID | None:
    """The Matrix event of the message at ``log_index`` (None: the bridge never bridged it).

    Either side may still be recording it: a message toward Matrix is sent before it is
    recorded (pipelined), and a Matrix user's message is recorded just after the log took it,
    when the native members may already be answering it."""
    await portal.records_flushed()
    table = MessageTable(portal.bridge.db)
    found = await table.event_for(portal.room_id, log_index)
    if found is not None or not await _sent_from_matrix(portal, log_index):
        return found
    for _ in range(_RECORD_WAITS):
        await asyncio.sleep(_RECORD_WAIT)
        found = await table.event_for(portal.room_id, log_index)
        if found is not None:
            break
    return found


async def _sent_from_matrix(portal: PortalFace, log_index: int) -> bool:
    """Whether the log entry was sent by the bridge (the bot or a bridged user's leaf)."""
    store = portal.bridge.kalandra.store if portal.bridge.kalandra is not None else None
    if store is None:
        return False
    frames = await store.load_frames(portal.room_id, log_index, 1)
    if not frames or frames[0].log_index != log_index:
        return False
    return _from_matrix(portal.bridge, frames[0].sender_id)


Pill = tuple[UserID, str, str]  # MXID, the name shown, the member's account name


async def _mention_pills(portal: PortalFace, content: Content) -> list[Pill]:
    """Each mentioned member as a Matrix user."""
    ids = content.extra.get(MENTIONS)
    if not isinstance(ids, list):
        return []
    bridge = portal.bridge
    out: list[Pill] = []
    for member_id in ids[:50]:
        if not isinstance(member_id, int) or isinstance(member_id, bool) or member_id <= 0:
            continue
        account = None
        if bridge.kalandra is not None:
            account = await bridge.kalandra.store.get_member(member_id)
        account_name = account.name if account is not None else str(member_id)
        mxid = await bridged_mxid(bridge.db, member_id)
        if mxid is not None:
            name = await _matrix_name(portal, mxid)
        else:
            puppet = await bridge.puppets.get(member_id)
            mxid, name = puppet.mxid, puppet.displayname
        out.append((mxid, name, account_name))
    return out


async def _matrix_name(portal: PortalFace, mxid: UserID) -> str:
    try:
        member = await portal.bridge.az.intent.get_room_member_info(portal.room_mxid, mxid)
    except Exception:  # the name is a nicety: the MXID stands in
        member = None
    return member.displayname if member is not None and member.displayname else mxid


def _with_pills(body: str, mentions: list[Pill]) -> str:
    """The body as HTML, the first mention of each member's name (display or account name,
    with or without "@", or the MXID) made a pill; pills never overlap."""
    text = html.escape(body)
    spans: list[tuple[int, int, str]] = []
    for mxid, shown, account_name in mentions:
        pill = f'<a href="https://matrix.to/#/{html.escape(mxid)}">{html.escape(shown)}</a>'
        for candidate in (f"@{shown}", shown, f"@{account_name}", account_name, mxid):
            found = _free(text, html.escape(candidate), spans)
            if found is not None:
                spans.append((found, found + len(html.escape(candidate)), pill))
                break
    out, position = [], 0
    for start, end, pill in sorted(spans):
        out += [text[position:start], pill]
        position = end
    out.append(text[position:])
    return "".join(out).replace("\n", "<br/>")


def _free(text: str, needle: str, spans: list[tuple[int, int, str]]) -> int | None:
    """The first occurrence of ``needle`` in ``text`` outside the spans taken."""
    start = text.find(needle) if needle else -1
    while start >= 0:
        end = start + len(needle)
        if all(end <= taken_start or start >= taken_end for taken_start, taken_end, _ in spans):
            return start
        start = text.find(needle, start + 1)
    return None


async def reaction_to_matrix(portal: PortalFace, item: ev.Reacted) -> None:
    """A native member's reaction added (the ghost reacts) or taken off (its reaction is
    redacted); the bridge's own members' reactions came from Matrix."""
    bridge = portal.bridge
    if _from_matrix(bridge, item.sender_id):
        return
    room = portal.room_mxid
    table = MessageTable(bridge.db)
    target = await matrix_event(portal, item.target)
    if target is None:
        await portal.advance(item.log_index, None)  # a message the bridge never saw
        return
    intent = await portal.ghost_intent(item.sender_id)
    txn = f"kalandra-{portal.hex}-{item.log_index}"
    if item.add:
        content = ReactionEventContent(
            relates_to=RelatesTo(rel_type=RelationType.ANNOTATION, event_id=target, key=item.key)
        )
        try:
            event_id = await ClientAPI.send_message_event(
                intent, room, EventType.REACTION, content, txn_id=txn
            )
        except MatrixRequestError as exc:
            if exc.errcode != "M_DUPLICATE_ANNOTATION":
                raise
            await portal.advance(item.log_index, None)  # the ghost reacted so already
            return
        await table.record_to_matrix(portal.room_id, item.log_index, room, event_id)
        portal.row.last_log_index = max(portal.row.last_log_index, item.log_index)
        return
    found = await _ghost_reaction(intent.api, room, target, intent.mxid, item.key)
    if found is not None:
        path = Path.v3.rooms[room].redact[found][txn]
        await intent.api.request(Method.PUT, path, content={})
    await portal.advance(item.log_index, None)


async def _ghost_reaction(
    api: HTTPAPI, room: RoomID, target: EventID, sender: UserID, key: str
) -> EventID | None:
    """The sender's m.reaction with ``key`` on ``target``, as Synapse has it (None: none)."""
    path = Path.v1.rooms[room].relations[target]["m.annotation"]["m.reaction"]
    query: dict[str, str] = {"limit": "100"}
    while True:
        page = await api.request(Method.GET, path, query_params=query)
        for event in page.get("chunk", []):
            relates = (event.get("content") or {}).get("m.relates_to") or {}
            if event.get("sender") == sender and relates.get("key") == key:
                return EventID(event["event_id"])
        if not page.get("next_batch"):
            return None
        query["from"] = page["next_batch"]


def _from_matrix(bridge: BridgeContext, member_id: int) -> bool:
    """The bot's or a bridged Matrix user's: it came from Matrix (no echo)."""
    return member_id == bridge.bot.member_id or member_id in bridge.bridged_users.member_ids


# --- Matrix -> Kalandra ---------------------------------------------------------------------


async def from_matrix(portal: PortalFace, content: MessageEventContent, body: Content) -> Content:
    """Add the reply, edit and mentions of a Matrix message to its Kalandra content."""
    mxid = portal.row.mxid
    assert mxid is not None
    get_reply = getattr(content, "get_reply_to", None)
    get_edit = getattr(content, "get_edit", None)
    reply_to = await _index(portal, get_reply() if get_reply is not None else None)
    edit_of = await _index(portal, get_edit() if get_edit is not None else None)
    mentions = await _mentioned_members(portal.bridge, content)
    extra = dict(body.extra)
    if mentions:
        extra[MENTIONS] = mentions
    return dataclasses.replace(
        body,
        reply_to=None if edit_of is not None else reply_to,
        edit_of=edit_of,
        extra=extra,
    )


async def unbridged_target(portal: PortalFace, work: FromMatrix) -> EventID | None:
    """The message a Matrix message replies to or edits, if the bridge has not bridged it."""
    content = work.content
    # Only parsed message contents have relations to read: an unknown msgtype arrives as a
    # generic Obj, whose every attribute is another Obj (nothing to call).
    if not isinstance(content, BaseMessageEventContent):
        return None
    target = content.get_edit() or content.get_reply_to()
    if target is None or await _index(portal, target) is not None:
        return None
    return EventID(target)


async def held_for_target(portal: PortalFace, work: FromMatrix, target: EventID | None) -> bool:
    """Whether ``work`` is held until ``target`` (waiting for its room key) is bridged; a
    message held before whose target never came goes without the pointer (as any other)."""
    mxid = portal.row.mxid
    return target is not None and mxid is not None and await e2ee.hold(portal, target, work)


async def _index(portal: PortalFace, event_id: EventID | None) -> int | None:
    mxid = portal.row.mxid
    if event_id is None or mxid is None:
        return None
    found = await MessageTable(portal.bridge.db).index_for(mxid, event_id)
    return found[1] if found is not None and found[0] == portal.room_id else None


async def _mentioned_members(bridge: BridgeContext, content: MessageEventContent) -> list[int]:
    mxids: list[str] = []
    mentions = content.get("m.mentions") if hasattr(content, "get") else None
    if isinstance(mentions, dict) and isinstance(mentions.get("user_ids"), list):
        mxids += [m for m in mentions["user_ids"] if isinstance(m, str)]
    formatted = getattr(content, "formatted_body", None)
    if isinstance(formatted, str) and getattr(content, "format", None) == Format.HTML:
        mxids += _PILL.findall(formatted)
    out: list[int] = []
    for mxid in mxids[:100]:
        member_id = await _member_of_mxid(bridge, mxid)
        if member_id is not None and member_id not in out:
            out.append(member_id)
    return out


async def _member_of_mxid(bridge: BridgeContext, mxid: str) -> int | None:
    """The member a Matrix user stands for: a ghost's native member, or a bridged user's
    puppet leaf (None: a Matrix user who is no Kalandra member)."""
    member_id = member_of(bridge, mxid)
    if member_id is not None:
        return member_id
    user = bridge.bridged_users.find(mxid)
    if user is not None:
        return user.member_id
    key = bridge.config.mls_state_key
    assert key is not None
    row = await BridgedUserTable(bridge.db, key).get(UserID(mxid))
    return None if row is None else row.member_id


class Held(Exception):  # not an error: the portal records it and moves on
    """A relation held until its target, which waits for its room key, is bridged (e2ee.hold)."""


LOST_TARGET = (
    "the message it relates to could not be decrypted by the bridge (its room key never"
    " came), so it has nothing to point at in Kalandra."
)


async def reaction_to_kalandra(portal: PortalFace, work: FromMatrix) -> None:
    """A Matrix user's reaction, as their puppet leaf's AppReaction (relay-only users' are
    refused: a reaction has no text to name them in). One to a message that waits for its room
    key is held until that message is bridged, and fails if it never is (encryption/e2ee.py)."""
    mxid = portal.row.mxid
    assert mxid is not None
    target = await _index(portal, work.relates_to)
    if target is None:
        if work.relates_to is not None and await e2ee.hold(portal, work.relates_to, work):
            raise Held
        if work.held:
            raise Refused(MessageStatusReason.GENERIC_ERROR, LOST_TARGET)
        return  # not a bridged message
    if work.permission not in ("user", "admin"):
        raise Refused(MessageStatusReason.NO_PERMISSION, REACTION_REFUSAL)
    user = await portal.bridge.bridged_users.get(work.sender, work.permission)
    key = work.key

    def build(core: ClientCore, room_int: int, epoch: int) -> tuple[int, bytes]:
        return reaction_frame(
            core, room_int=room_int, epoch=epoch, target=target, key=key, add=True, now=time.time()
        )

    index = await send_logged(portal.bridge, user, portal.room_id, build)
    await MessageTable(portal.bridge.db).record_to_kalandra(
        portal.room_id, index, mxid, work.event_id
    )


async def unreact(portal: PortalFace, work: FromMatrix, log_index: int) -> bool:
    """The redaction of a bridged user's reaction (by that user): the member takes it off.
    False when ``log_index`` is not such a reaction (the caller redacts it as moderation)."""
    bridge = portal.bridge
    assert bridge.kalandra is not None
    frames = await bridge.kalandra.store.load_frames(portal.room_id, log_index, 1)
    if not frames or frames[0].log_index != log_index or frames[0].opcode != Opcode.APP_REACTION:
        return False
    stored = frames[0]
    user = bridge.bridged_users.find(work.sender)
    if user is None or user.member_id != stored.sender_id or stored.payload is None:
        return False
    reaction = decode_payload(Opcode.APP_REACTION, stored.payload)
    assert isinstance(reaction, Reaction)
    if not reaction.add:
        return True

    def build(core: ClientCore, room_int: int, epoch: int) -> tuple[int, bytes]:
        return reaction_frame(
            core,
            room_int=room_int,
            epoch=epoch,
            target=reaction.message_log_index,
            key=reaction.content,
            add=False,
            now=time.time(),
        )

    index = await send_logged(portal.bridge, user, portal.room_id, build)
    mxid = portal.row.mxid
    assert mxid is not None
    await MessageTable(bridge.db).record_to_kalandra(portal.room_id, index, mxid, work.event_id)
    return True


async def send_logged(
    bridge: BridgeContext, user: BridgedMember, room_id: bytes, build: FrameBuilder
) -> int:
    """A plaintext logged frame (reaction, receipt) as the bridged user's leaf; its log index.
    Built at the bot's epoch for the room; a StaleEpoch catches the bot up and builds again."""
    await user.ensure_in_room(room_id)

    async def attempt() -> Frame:
        room = bridge.bot.core.rooms[room_id]
        rid, data = build(user.core, room.room_int, room.epoch)
        return await user.request(rid, data)

    return await user.at_current_epoch(room_id, attempt)
