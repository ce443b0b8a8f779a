"""Acceptance of cluster mode: three server processes on one PostgreSQL database, native
clients on different processes in one room; the room's owner killed mid-traffic, or paused
past its lease and resumed (its writes are refused by the fencing token)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from acceptance.acceptance_harness import (
    Harness,
    RawConnection,
    ServerProcess,
    assert_dense,
    failures,
    message_from,
    shared_room,
)
from cluster.cluster_harness import (
    LEASE,
    RENEW,
    Sender,
    cluster,
    harnesses,
    lease_taken_at,
    pause,
    resume,
)
from helpers.native import within

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client, ClientError
from kalandra_core.proto import ErrorCode, Frame, Opcode
from kalandra_core.storage.sql import SqlStore

pytestmark = pytest.mark.postgres


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[str, list[ServerProcess]]]:
    with cluster(tmp_path, 3) as running:
        yield running


@pytest.fixture
async def three(
    processes: tuple[str, list[ServerProcess]], tmp_path: Path
) -> AsyncIterator[tuple[list[Harness], list[ServerProcess]]]:
    url, nodes = processes
    store = await SqlStore.open(url, migrate=False)
    hs = harnesses(nodes, store, tmp_path)
    try:
        yield hs, nodes
    finally:
        for h in hs:
            await h.close()
        await store.close()


async def owner_of(store: SqlStore, room_id: bytes) -> str | None:
    return await store.lease_owner(room_id)


async def log_of(store: SqlStore, room_id: bytes) -> list[Frame]:
    return [Frame.decode(f.encode()) for f in await store.load_frames(room_id, 0, 100_000)]


def check_log(log: list[Frame], senders: list[Sender]) -> None:
    """Dense, no index twice, no request numbered twice, every acknowledged frame at its index
    (sent by its sender) once."""
    assert_dense(log)
    requests = [(f.header.sender_id, f.header.request_id) for f in log if f.header.request_id]
    assert len(requests) == len(set(requests)), "a request was numbered twice"
    indexes = [i for s in senders for i in s.acked.values()]
    assert len(indexes) == len(set(indexes)), "two acknowledgements name one index"
    for s in senders:
        for index in s.acked.values():
            assert log[index].header.opcode == Opcode.APP_MESSAGE
            assert log[index].header.sender_id == s.client.core.member_id


def _applied(client: Client, room_id: bytes, last: int) -> bool:
    return client.core.rooms[room_id].last_seen == last


async def converged(clients: list[Client], room_id: bytes, head: int) -> None:
    """Every client applied the whole log, on one epoch."""
    for c in clients:
        await within(c.sync(room_id))
        await within(c.wait_for(functools.partial(_applied, c, room_id, head - 1)), 60)
    epochs = {c.core.rooms[room_id].epoch for c in clients}
    assert len(epochs) == 1, epochs


async def test_kill_the_owner_of_a_busy_room(
    three: tuple[list[Harness], list[ServerProcess]],
) -> None:
    hs, nodes = three
    store = hs[0].store
    creator_u, bob_u, carol_u, dave_u = await hs[0].users("creator", "bob", "carol", "dave")
    creator = await hs[0].connect(creator_u)  # on node0, which will own the room
    bob = await hs[1].connect(bob_u)
    carol = await hs[2].connect(carol_u)
    dave = await hs[1].connect(dave_u)
    room = await shared_room(hs[0], creator, (bob, bob_u), (carol, carol_u), (dave, dave_u))
    assert await owner_of(store, room) == "node0"

    senders = [Sender(c, room, n) for c, n in ((bob, "bob"), (carol, "carol"), (dave, "dave"))]
    runs = [asyncio.create_task(s.run(40)) for s in senders]
    # Busy: traffic through the owner (checked as frames reach bob, which they keep doing).
    await within(bob.wait_for(lambda: sum(len(s.acked) for s in senders) >= 30), 60)
    killed_at = time.time()
    nodes[0].kill()
    await within(asyncio.gather(*runs), 120)

    assert await owner_of(store, room) in ("node1", "node2")
    taken_at = lease_taken_at(nodes, room, 2)
    assert taken_at is not None
    after = sorted(t for s in senders for t in s.ack_times if t > taken_at)
    assert after, "nothing acknowledged by the new owner"
    print(
        f"lease taken {taken_at - killed_at:.2f} s after kill -9, first new ack "
        f"{after[0] - killed_at:.2f} s after the kill (lease {LEASE} s)"
    )
    # Served again within the lease term: the lease ran out at most LEASE after the kill (its
    # last renewal came before it); the taker polls every 0.2 s, plus a loaded machine's delays.
    assert taken_at - killed_at < LEASE + 1.0

    log = await log_of(store, room)
    check_log(log, senders)
    # An epoch change after the failover: everyone follows it.
    await within(bob.self_update(room), 30)
    log = await log_of(store, room)
    await converged([bob, carol, dave], room, len(log))
    assert {c.core.rooms[room].epoch for c in (bob, carol, dave)} == {2}


async def test_a_paused_owner_is_fenced_after_its_lease(
    three: tuple[list[Harness], list[ServerProcess]],
) -> None:
    hs, nodes = three
    store = hs[0].store
    alice_u, bob_u, carol_u = await hs[0].users("alice", "bob", "carol")
    alice = await hs[0].connect(alice_u)  # on node0, the owner
    bob = await hs[1].connect(bob_u)
    carol = await hs[2].connect(carol_u)
    room = await shared_room(hs[0], alice, (bob, bob_u), (carol, carol_u))
    for i in range(5):
        await within(bob.send_text(room, f"before {i}"))
    assert await owner_of(store, room) == "node0"
    before = (await store.load_room(room)).room.next_log_index  # type: ignore[union-attr]

    pause(nodes[0])
    # While node0 is stopped, alice's frames wait in its socket buffer.
    rid, data = alice.core.send_message(room, Content(body="while paused"), now=alice.clock())
    alice_send = asyncio.create_task(alice.request(rid, data))
    await asyncio.sleep(LEASE + RENEW + 0.5)  # node0's lease has run out
    # A sync through node1 makes node1 take the room (failover on demand) without writing.
    raw = await RawConnection.open(nodes[1], "tcp")
    await raw.hello(bob_u.token, bob.core.signing_key)
    synced = await raw.sync_all(bob_u.member_id, room)
    raw.close()
    assert len(synced) == before
    assert await owner_of(store, room) == "node1"

    resume(nodes[0])
    # node0 wakes with the frame queued and a lease it no longer holds. Its worker refuses it
    # (the append is fenced, or the renewal, if node0 ran it first, ended the worker) and
    # nothing is stored; or, when the worker was already gone, node0 forwards it to node1,
    # which numbers it after everything stored before. Never does node0 number it.
    index: int | None = None
    refusal: int | None = None
    try:
        index = await within(alice_send, 30)
    except ClientError as refused:
        refusal = refused.code
    assert (index is None) == (refusal == ErrorCode.STORAGE_ERROR)
    head = (await store.load_room(room)).room.next_log_index  # type: ignore[union-attr]
    assert head == (before if index is None else before + 1)
    if index is not None:
        assert index == before

    # alice recovers through node0, which now forwards to node1; everyone converges.
    sender = Sender(alice, room, "alice")
    await within(sender.run(3), 60)
    await within(bob.send_text(room, "after"), 30)
    log = await log_of(store, room)
    check_log(log, [sender])
    await converged([alice, bob, carol], room, len(log))
    text = nodes[0].log.read_text(errors="replace")
    # Refused by the fencing token in the append's transaction, or by the renewal that found
    # the lease gone, whichever node0 ran first on waking.
    assert "append fenced" in text or "lease of room" in text


async def test_a_frame_forwarded_to_a_paused_owner_is_answered_once(
    three: tuple[list[Harness], list[ServerProcess]],
) -> None:
    """bob (on node1) sends while the room's owner node0 is paused: node1 gives up on node0,
    takes the room and acknowledges the frame. node0, resumed, still handles the forwarded copy
    (refused: its lease is gone); that late refusal must not reach bob as a failure."""
    hs, nodes = three
    store = hs[0].store
    alice_u, bob_u = await hs[0].users("alice", "bob")
    alice = await hs[0].connect(alice_u)  # on node0, the owner
    bob = await hs[1].connect(bob_u)
    room = await shared_room(hs[0], alice, (bob, bob_u))
    for i in range(3):
        await within(bob.send_text(room, f"before {i}"))
    assert await owner_of(store, room) == "node0"
    assert failures(bob) == []

    pause(nodes[0])
    index = await within(bob.send_text(room, "while node0 is paused"), 30)
    assert await owner_of(store, room) == "node1"
    resume(nodes[0])
    # node0 answers the forwarded copy it finds on waking; then alice's next frame, forwarded
    # by node0 after that answer (the bus keeps a sender's order), is the marker. (Sent again
    # if node0 refuses it first: its worker may not know yet that the room is gone.)
    await within(Sender(alice, room, "alice").send("marker"), 30)
    await message_from(bob, alice_u.member_id, "marker")
    log = await log_of(store, room)
    check_log(log, [])
    assert log[index].header.sender_id == bob_u.member_id
    assert [f for f in log if f.header.sender_id == bob_u.member_id][-1] is log[index]
    assert failures(bob) == []
