"""The client's window of syncs (sans-IO): after a connect, at most SYNC_WINDOW rooms' syncs
are in flight, the rest wait their turn, a sync something waits for (a gap before a live
frame) goes first, and each room says CaughtUp once it has applied the log."""

from __future__ import annotations

from nacl.signing import SigningKey

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.recovery import SYNC_WINDOW
from kalandra_core.proto import Frame, FrameHeader, Opcode, SyncRequest, SyncResponse
from kalandra_core.proto import decode_payload as decode
from kalandra_core.server import replies

NOW = 1_000.0
ROOMS = SYNC_WINDOW * 3


def syncs(events: list[ev.Event]) -> list[Frame]:
    """The sync requests among ``events``, in order."""
    frames = [Frame.decode(e.frame) for e in events if isinstance(e, ev.Outgoing)]
    return [f for f in frames if f.header.opcode == Opcode.SYNC_REQUEST]


def answer(core: ClientCore, request: Frame) -> list[ev.Event]:
    """The server's answer: nothing after the room's last applied index."""
    h = request.header
    response = SyncResponse(frames=[], has_more=False, server_epoch=h.epoch)
    data = replies.answer(h, Opcode.SYNC_RESPONSE, response, epoch=h.epoch)
    return core.receive(Frame.decode(data), now=NOW)


def connected_core() -> tuple[ClientCore, list[bytes], list[Frame]]:
    core = ClientCore(7, bytes(SigningKey.generate()))
    rooms = [core.create_room(name=f"room {i}", now=NOW)[0] for i in range(ROOMS)]
    return core, rooms, syncs(core.resync_all(now=NOW))


def test_a_connect_keeps_a_few_syncs_in_flight_and_the_rest_waiting() -> None:
    core, rooms, sent = connected_core()
    assert [f.header.room_id_bytes for f in sent] == rooms[:SYNC_WINDOW]
    assert core.catching_up == set(rooms)
    seen: list[bytes] = [f.header.room_id_bytes for f in sent]
    caught_up: list[bytes] = []
    queue = list(sent)
    while queue:  # each answer lets the next waiting room's sync out, in order
        events = answer(core, queue.pop(0))
        caught_up += [e.room_id for e in events if isinstance(e, ev.CaughtUp)]
        more = syncs(events)
        assert len(more) <= 1
        assert len(core.sync_requests) <= SYNC_WINDOW
        queue += more
        seen += [f.header.room_id_bytes for f in more]
    assert seen == rooms
    assert caught_up == rooms  # each once
    assert not core.catching_up
    assert not any(core.rooms[r].syncing for r in rooms)


def test_a_room_something_waits_for_is_synced_first() -> None:
    core, rooms, sent = connected_core()
    last = rooms[-1]
    # A live frame of the last room, after a gap: its sync is wanted now.
    live = FrameHeader(
        Opcode.APP_MESSAGE, room_id=int.from_bytes(last, "big"), sender_id=9, context_id=5
    )
    assert syncs(core.receive(Frame.new(live), now=NOW)) == []  # (the window is full)
    assert next(iter(core.sync_waiting)) == last
    following = syncs(answer(core, sent[0]))
    assert [f.header.room_id_bytes for f in following] == [last]
    request = decode(Opcode.SYNC_REQUEST, following[0].payload)
    assert isinstance(request, SyncRequest)
    assert request.from_log_index == core.rooms[last].last_seen + 1
