"""A core commits proposals on behalf of the members it holds (``ClientCore.commit_for``): when
the member whose turn it is to commit a server Remove is a leaf that never processes anything
(a bridge's puppet leaf), the core holding it commits instead, and a kicked member is never the
one expected to commit its own removal."""

from __future__ import annotations

from nacl.signing import SigningKey

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.server.app import RunningServer


async def connect(server: RunningServer, member_id: int) -> Client:
    token = await server.store.issue_token(member_id)
    assert server.tcp_port is not None
    client = Client(
        ClientCore(member_id, bytes(SigningKey.generate())),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        token,
        reconnect=False,
    )
    await client.connect()
    await client.publish_key_packages(1)
    return client


async def test_the_holder_commits_a_remove_for_its_held_member(server: RunningServer) -> None:
    ids = sorted([(await server.store.create_member(f"m{n}")).member_id for n in range(3)])
    held_id, others = ids[0], ids[1:]  # the held member is the one whose turn it is
    held = await connect(server, held_id)
    await held.close()  # from now on it processes nothing, like a puppet leaf
    holder = await connect(server, others[0])
    target = await connect(server, others[1])
    holder.core.commit_for = {held_id}

    room = await holder.create_room()
    await holder.invite(room, [held_id, target.core.member_id])
    await target.wait_for(lambda: room in target.core.rooms)
    await target.settle()
    epoch = holder.core.rooms[room].epoch

    await holder.moderate(room, "kick", target.core.member_id, "bye")
    await holder.wait_for(
        lambda: (
            holder.core.rooms[room].epoch > epoch
            and target.core.member_id not in holder.core.rooms[room].roster()
        )
    )
    events = []
    while not holder.events.empty():
        events.append(holder.events.get_nowait())
    assert any(
        isinstance(e, ev.EpochChanged) and target.core.member_id in e.removed for e in events
    )
    assert held_id in holder.core.rooms[room].roster()
    for client in (holder, target):
        await client.close()
