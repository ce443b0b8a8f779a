"""That nothing else arrives, without a fixed wait: a marker goes the same way behind what must
not come, and once the marker is there, what came before it is all that will come.

That holds where the way keeps the order: a Kalandra room's log has one order, and each
member's client applies it in that order; a portal's queue toward Kalandra handles the Matrix
room's events in the order Synapse delivered them, each done before the next (what the bridge
sends to Kalandra for an earlier event is sequenced before a later event's); a portal's queue
toward Matrix sends the room's log in log order, each event once the one before is sent; and a
Matrix room's timeline is in the order its events were sent. Each test says which way its
marker goes and why that way carries what it must not see.
"""

from __future__ import annotations

import asyncio
import secrets

from nio import AsyncClient

from helpers.matrix import next_in_room, say, text_of
from helpers.native import WITHIN
from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message


def marker() -> str:
    return f"marker {secrets.token_hex(4)}"


async def native_until(
    native: Client, room: bytes, body: str, within: float = WITHIN
) -> tuple[Message, list[Message]]:
    """Wait until ``native`` gets the message ``body`` in ``room``: it, and the messages from
    other members it got in ``room`` before it, oldest first."""
    mine = native.core.member_id
    before: list[Message] = []
    async with asyncio.timeout(within):
        while True:
            message = await native.messages.get()
            if message.room_id != room:
                continue
            if message.content.body == body:
                return message, before
            if message.sender_id != mine:
                before.append(message)


async def marker_to_native(
    matrix: AsyncClient, portal: str, native: Client, room: bytes, within: float = WITHIN
) -> tuple[Message, list[Message]]:
    """A marker from the Matrix user into the portal, through the portal's queue toward
    Kalandra to ``native``: the marker, and the messages from others ``native`` got before it
    (everything the bridge sent to Kalandra for the portal's earlier events)."""
    body = marker()
    await say(matrix, portal, body)
    return await native_until(native, room, body, within)


async def marker_to_matrix(
    native: Client,
    room: bytes,
    matrix: AsyncClient,
    portal: str,
    ghost: str,
    within: float = WITHIN,
) -> str:
    """A marker from ``native`` (its ghost is ``ghost``) into the room, through the portal's
    queue toward Matrix: once ``matrix`` sees it, the portal has sent everything of the log
    before it. The marker's body (it is the ghost's latest text)."""
    body = marker()
    await native.send_text(room, body)
    await next_in_room(
        matrix, portal, lambda e: text_of(e, ghost) == body, f"the marker {body!r}", within
    )
    return body
