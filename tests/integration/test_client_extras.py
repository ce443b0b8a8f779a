"""Reactions, receipts, typing and edits between native clients through a real server: what the
other member's client reports, and that the logged ones (reactions, receipts) come back from
the log after a reconnect while typing does not; a plain ClientCore in the room is unaffected."""

from __future__ import annotations

import asyncio

from helpers.native import make_client, next_event

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
from kalandra_core.client.extras import ExtendedCore, mark_read, react, set_typing
from kalandra_core.server.app import RunningServer

WITHIN = 15.0


async def test_reactions_receipts_typing_and_edits(server: RunningServer) -> None:
    a = await make_client(server, "a", core=ExtendedCore)
    b = await make_client(server, "b", core=ExtendedCore)
    plain = await make_client(server, "plain")
    room = await a.create_room()
    await a.invite(room, [b.core.member_id, plain.core.member_id])
    await b.wait_for(lambda: room in b.core.rooms)
    await plain.wait_for(lambda: room in plain.core.rooms)
    await b.settle()
    a_id = a.core.member_id

    def from_a(event: ev.Reacted | ev.Receipted | ev.Typing) -> bool:
        return event.sender_id == a_id

    # An edit is a message naming the one it replaces.
    first = await b.send(room, Content(body="frist"))
    edit = await b.send(room, Content(body="first", edit_of=first))
    bodies: list[tuple[str, int | None]] = []
    while len(bodies) < 2:
        message = await asyncio.wait_for(a.messages.get(), WITHIN)
        if message.sender_id == b.core.member_id:
            bodies.append((message.content.body, message.content.edit_of))
    assert bodies == [("frist", None), ("first", first)]

    # Live: a reaction and typing reach the other member's client.
    reaction = await react(a, room, first, "👍")
    added = await next_event(b, ev.Reacted, from_a)
    assert (added.log_index, added.target, added.key, added.add) == (reaction, first, "👍", True)
    set_typing(a, room, True, 5000)
    typing = await next_event(b, ev.Typing, from_a)
    assert (typing.typing, typing.timeout_ms) == (True, 5000)
    set_typing(a, room, False)
    assert (await next_event(b, ev.Typing, from_a)).typing is False

    # While b is away: the logged ones wait in the log for its catch-up; typing is not kept.
    await b.close()
    unreaction = await react(a, room, first, "👍", add=False)
    receipt = await mark_read(a, room, edit)
    set_typing(a, room, True)
    assert reaction < unreaction < receipt
    b2 = Client(b.core, b.address, b._token, reconnect=False)
    await b2.connect()
    await b2.settle()
    await b2.wait_for(lambda: b2.core.rooms[room].last_seen >= receipt)
    caught_up: list[ev.Event] = []
    while not b2.events.empty():
        event = b2.events.get_nowait()
        if isinstance(event, (ev.Reacted, ev.Receipted, ev.Typing)):
            caught_up.append(event)
    assert len(caught_up) == 2, caught_up
    removed, read = caught_up
    assert isinstance(removed, ev.Reacted)
    assert (removed.log_index, removed.key, removed.add) == (unreaction, "👍", False)
    assert isinstance(read, ev.Receipted)
    assert (read.log_index, read.target, read.kind) == (receipt, edit, "Read")
    assert read.timestamp_ms > 0

    # The plain core applied the same log without reporting (nor choking on) the new frames.
    await plain.wait_for(lambda: plain.core.rooms[room].last_seen >= receipt)
    while not plain.events.empty():
        assert not isinstance(plain.events.get_nowait(), (ev.Reacted, ev.Receipted, ev.Typing))
    for client in (a, b2, plain):
        await client.close()
