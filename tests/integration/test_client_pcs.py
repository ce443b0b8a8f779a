"""Post-compromise security in the client: a member that sent its budget of messages (or lived
its time budget) in a room commits a self-update on its own, and everyone follows."""

from __future__ import annotations

from helpers.native import make_client

from kalandra_core.mls.update_tracker import UpdatePolicy
from kalandra_core.server.app import RunningServer


async def test_message_budget_triggers_a_self_update(server: RunningServer) -> None:
    frequent = UpdatePolicy(messages=3, seconds=3600)
    a = await make_client(server, "alice", policy=frequent, key_packages=0)
    b = await make_client(server, "bob")
    room_id = await a.create_room()
    await a.invite(room_id, [b.core.member_id])
    await b.wait_for(lambda: room_id in b.core.rooms)
    await b.settle()
    start = a.core.rooms[room_id].epoch
    for n in range(3):
        await a.send_text(room_id, f"m{n}")
    # The third message spent the budget: alice committed a fresh leaf, bob followed.
    await a.wait_for(lambda: a.core.rooms[room_id].epoch == start + 1)
    await b.wait_for(lambda: b.core.rooms[room_id].epoch == start + 1)
    ra, rb = a.core.rooms[room_id], b.core.rooms[room_id]
    assert ra.group.epoch_authenticator == rb.group.epoch_authenticator
    assert not ra.updates.due(a.clock())
    # Messages keep flowing in the new epoch.
    index = await b.send_text(room_id, "after the update")
    assert index > 0
    for c in (a, b):
        await c.close()


async def test_time_budget_triggers_a_self_update(server: RunningServer) -> None:
    now = [1_000_000.0]
    policy = UpdatePolicy(messages=1000, seconds=60)
    a = await make_client(server, "alice", policy=policy, key_packages=0)
    a.clock = lambda: now[0]
    room_id = await a.create_room()
    a.maintain()
    assert a.core.rooms[room_id].epoch == 0  # not due yet
    now[0] += 61
    a.maintain()
    await a.wait_for(lambda: a.core.rooms[room_id].epoch == 1)
    await a.close()
