"""The bot's own message for a Matrix event (a relayed message, room metadata of a user without
an MLS leaf): at most one in Kalandra, whatever crash comes between the send and the record.

Before the message goes out, its request id is written under the event id (bridge_outgoing,
with no frame: the bot's client keeps and re-encrypts its own outbox). A Matrix event replayed
after a crash is sent again under that request id: the server answers a request it sequenced
already with the stored message (it de-duplicates by sender and request id), and the client
awaits a request of its restored outbox instead of sending it twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.types import EventID

from kalandra_core.client.content import Content
from kalandra_core.client.profile import Profile, with_profile

from ..db import Outgoing, OutgoingTable
from .send_chains import ensure_send_floors

if TYPE_CHECKING:
    from ..context import BridgeContext


async def bot_send(
    bridge: BridgeContext, room_id: bytes, content: Content, event_id: EventID
) -> int:
    """Send ``content`` through the bot's leaf for ``event_id``; returns its log index. It
    carries the bot's profile (its display name and MXID), as a bridged user's message does."""
    name = bridge.config["appservice.bot_displayname"]
    name = name if isinstance(name, str) and name != "remove" else None
    content = with_profile(content, Profile(displayname=name, mxid=bridge.az.bot_mxid))
    client = bridge.bot.client
    assert client is not None
    outgoing = OutgoingTable(bridge.db)
    member_id = client.core.member_id
    prepared = await outgoing.get(event_id)
    if prepared is not None and prepared.sender_id == member_id and prepared.room_id == room_id:
        request_id = prepared.request_id  # sent before a crash, perhaps sequenced
    else:
        request_id = client.core.next_request_id()
        await outgoing.prepare(Outgoing(event_id, room_id, member_id, request_id, b""))
    await ensure_send_floors(bridge, room_id)
    return await client.send(room_id, content, request_id=request_id)
