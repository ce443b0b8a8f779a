"""The cluster's sans-IO parts: bus messages (encode/decode) and Routes (owners, forwarded
frames, suspects) on an explicit clock."""

from __future__ import annotations

import asyncio

import pytest

from kalandra_core.proto import Frame, FrameHeader, Opcode, RawPayload
from kalandra_core.server import bus
from kalandra_core.server.routes import Routes

ROOM = (7).to_bytes(16, "big")


def frame(request_id: int) -> Frame:
    header = FrameHeader(
        Opcode.APP_MESSAGE, request_id=request_id, room_id=7, sender_id=5, epoch=1
    )
    return Frame.build(header, RawPayload(b"x" * 10))


@pytest.mark.parametrize(
    "message",
    [
        bus.Forward("node-é", 12, (1 << 64) - 1, 2, b"frame bytes"),
        bus.Forward("n2", 1, 5, 1, b"frame", forward_id=3, after=(1 << 64) - 1),
        bus.Reply("node-b", 3, b""),
        bus.Deliver((1, 2, (1 << 64) - 1), b"frame"),
        bus.Deliver((), b"frame"),
        bus.Probe("node-é", (1 << 64) - 1),
        bus.Alive("n2", 1),
    ],
)
def test_bus_messages_round_trip(message: bus.Message) -> None:
    assert bus.decode(bus.encode(message)) == message


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x09",
        b"\x01\x00\x05ab",
        b"\x04\x00\x02ab\x00",
        b"\x03\x00\x00\x00\x09",
        b"\x05\x00\x01a\x00\x00",  # a probe without its whole nonce
    ],
)
def test_a_broken_bus_message_is_refused(body: bytes) -> None:
    with pytest.raises(bus.BusDecodeError):
        bus.decode(body)


def routes() -> Routes[str]:
    return Routes("me", owner_ttl=1.0, forward_timeout=2.0, suspect_for=5.0)


def test_an_owner_is_trusted_for_its_ttl_only() -> None:
    r = routes()
    r.saw_owner(ROOM, "other", now=10.0)
    assert r.owner(ROOM, 10.9) == "other"
    assert r.owner(ROOM, 11.0) is None
    r.saw_owner(ROOM, "me", now=12.0)  # ourselves: never "another node"
    assert r.owner(ROOM, 12.0) is None


def test_an_answered_forward_is_forgotten() -> None:
    r = routes()
    r.forwarded("session", 5, frame(9), "other", 1, now=0.0)
    assert r.waiting == 1
    r.answered(5, 9)
    assert r.waiting == 0
    assert r.overdue(100.0) == []


def test_an_unanswered_forward_makes_its_owner_a_suspect() -> None:
    r = routes()
    r.saw_owner(ROOM, "other", now=0.0)
    r.forwarded("session", 5, frame(9), "other", 1, now=0.0)
    r.forwarded("session", 5, frame(0), "other", 1, now=0.0)  # no request id: not tracked
    assert r.overdue(1.9) == []
    late = r.overdue(2.0)
    assert [(w.session, w.frame.header.request_id, w.attempts) for w in late] == [
        ("session", 9, 1)
    ]
    assert r.is_suspect("other", 2.0)
    assert r.owner(ROOM, 0.5) is None  # forgotten as the room's owner
    assert not r.is_suspect("other", 7.0)  # a suspect for suspect_for seconds


def test_a_given_up_owner_answers_no_more() -> None:
    r = routes()
    r.forwarded("session", 5, frame(9), "old", 1, now=0.0)
    r.overdue(2.0)
    r.forwarded("session", 5, frame(9), "new", 2, now=5.0)  # routed again
    assert r.stale_answer(5, 9, "old", now=5.5)
    assert not r.stale_answer(5, 9, "new", now=5.5)
    assert not r.stale_answer(5, 8, "old", now=5.5)
    r.overdue(7.5)  # (forgets what is past suspect_for)
    assert not r.stale_answer(5, 9, "old", now=7.5)


def test_the_memory_bus_delivers_in_order_and_not_to_itself() -> None:
    network = bus.MemoryNetwork()
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    nodes = {name: bus.MemoryBus(network, name) for name in got}

    async def start() -> None:
        for name, node in nodes.items():
            await node.start(got[name].append)

    asyncio.run(start())
    nodes["a"].send("b", b"1")
    nodes["a"].broadcast(b"2")
    network.down.add("c")
    nodes["a"].broadcast(b"3")
    assert got == {"a": [], "b": [b"1", b"2", b"3"], "c": [b"2"]}


def room_frame(request_id: int, room: int = 7) -> Frame:
    header = FrameHeader(
        Opcode.APP_MESSAGE, request_id=request_id, room_id=room, sender_id=5, epoch=1
    )
    return Frame.build(header, RawPayload(b"x" * 10))


def test_a_members_frames_stay_behind_its_unanswered_ones() -> None:
    # Failover order: frames 1 and 2 went to the old owner; frame 3 must not reach a new owner
    # before them, and when 1 is overdue, 2 (not yet overdue) is routed again with it, in order.
    r = routes()
    other_room = (8).to_bytes(16, "big")
    assert r.waiting_on(5, ROOM) is None
    r.forwarded("s", 5, room_frame(1), "old", 1, now=0.0)
    r.forwarded("s", 5, room_frame(2), "old", 1, now=1.0)
    r.forwarded("s", 5, room_frame(9, room=8), "other", 1, now=1.0)
    assert r.waiting_on(5, ROOM) == "old"
    assert r.waiting_on(6, ROOM) is None
    assert r.waiting_on(5, other_room) == "other"
    late = r.overdue(2.0)
    assert [w.frame.header.request_id for w in late] == [1, 2]
    assert r.waiting_on(5, ROOM) is None
    assert r.is_suspect("old", 2.0)
    assert r.waiting_on(5, other_room) == "other"  # another room's frames are not held back
    r.answered(5, 9)
    assert r.waiting_on(5, other_room) is None
    assert r.waiting == 0


def test_a_node_given_up_on_and_asked_again_is_heard() -> None:
    # The room had not moved: the frame routed again went to the same owner (slow, not dead).
    # Its answer is the one awaited now; dropping it would leave the frame unanswered forever.
    r = routes()
    r.forwarded("s", 5, room_frame(1), "slow", 1, now=0.0)
    assert [w.frame.header.request_id for w in r.overdue(2.0)] == [1]
    assert r.stale_answer(5, 1, "slow", 2.1)
    r.forwarded("s", 5, room_frame(1), "slow", 2, now=2.1)
    assert not r.stale_answer(5, 1, "slow", 2.2)
    r.forwarded("s", 5, room_frame(2), "slow", 1, now=2.1)
    assert [w.frame.header.request_id for w in r.overdue(4.1)] == [1, 2]
    r.forwarded("s", 5, room_frame(2), "new", 2, now=4.2)  # the room moved meanwhile
    assert r.stale_answer(5, 2, "slow", 4.3)


def test_a_forward_names_the_unanswered_one_before_it_at_the_same_node() -> None:
    r = routes()
    assert r.after(5, ROOM, "w") == 0
    r.forwarded("s", 5, room_frame(1), "w", 1, now=0.0, forward_id=101)
    assert r.after(5, ROOM, "w") == 101
    r.forwarded("s", 5, room_frame(2), "w", 1, now=0.1, forward_id=102)
    assert r.after(5, ROOM, "w") == 102
    assert r.after(5, ROOM, "x") == 0  # another node: it never saw them
    assert r.after(6, ROOM, "w") == 0
    r.answered(5, 2)  # (taken there: what comes next may come after it)
    assert r.after(5, ROOM, "w") == 102
    r.answered(5, 1)
    assert r.after(5, ROOM, "w") == 0
    r.forwarded("s", 5, room_frame(3), "w", 1, now=0.2, forward_id=103)
    r.forwarded("s", 5, room_frame(4), "w", 1, now=0.3, forward_id=104)
    r.overdue(2.5)  # routed again from the first, which then comes after nothing
    assert r.after(5, ROOM, "w") == 0
    r.forwarded("s", 5, room_frame(3), "w", 2, now=2.5, forward_id=105)
    assert r.after(5, ROOM, "w") == 105  # the forward sent last, not an earlier one of it
