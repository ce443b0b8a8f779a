"""EpochChanged describes its own commit: the commit's log index and the group (members, tree
hash, suite) as it stood right after it, even when the application reads the event after
later commits of the same catch-up were applied (what the bridge mirrors per epoch)."""

from __future__ import annotations

from helpers.native import make_client

from kalandra_core.client import events as ev
from kalandra_core.client.driver import Client
from kalandra_core.server.app import RunningServer


async def test_epoch_changed_carries_its_commit(server: RunningServer) -> None:
    a, b, c, d = [await make_client(server, name) for name in ("a", "b", "c", "d")]
    room_id = await a.create_room()
    await a.invite(room_id, [b.core.member_id])
    await b.wait_for(lambda: room_id in b.core.rooms)
    await b.settle()
    await b.close()  # away while two commits happen
    first = await a.invite(room_id, [c.core.member_id])
    second = await a.remove(room_id, [c.core.member_id])
    await a.invite(room_id, [d.core.member_id])
    # Back: the catch-up applies the three commits in one page, then the events are read.
    b2 = Client(b.core, b.address, b._token, reconnect=False)
    await b2.connect()
    await b2.settle()
    changes = []
    while not b2.events.empty():
        event = b2.events.get_nowait()
        if isinstance(event, ev.EpochChanged):
            changes.append(event)
    assert [e.log_index for e in changes[:2]] == [first, second]
    ids = {x.core.member_id for x in (a, b)}
    assert set(changes[0].members) == ids | {c.core.member_id}
    assert changes[0].added == (c.core.member_id,)
    assert set(changes[1].members) == ids
    assert changes[1].removed == (c.core.member_id,)
    assert set(changes[2].members) == ids | {d.core.member_id}
    group = b2.core.rooms[room_id].group
    assert changes[2].tree_hash == group.tree_hash
    assert changes[2].cipher_suite == group.suite
    tree_hashes = [e.tree_hash for e in changes]
    assert len(set(tree_hashes)) == 3
    for client in (a, c, d, b2):
        await client.close()
