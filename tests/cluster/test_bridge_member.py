"""The bridge unchanged in a cluster: its embedded homeserver is one node (``server.cluster``
on) of two on one PostgreSQL database, the other a plain ``kalandra serve``; a real Synapse; a
native client connected to the OTHER node.

Checked end to end, in order and exactly once: the other node names the bridge in HelloReply
and a native member there lets alice in (`kalandra invite ROOM bridge`, then `@alice`); a
portal of a room whose lease the other node holds (the bot's frames are forwarded to it), with
media both ways; a portal of a room the bridge's node owns (the native client's frames are
forwarded to the bridge's node); and, last, the other node killed (kill -9) while alice's
messages to its room are on their way: the bridge's node takes the room once the lease runs out
and messages flow both ways again, nothing twice.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from acceptance.acceptance_harness import ServerProcess, assert_dense
from cluster.cluster_harness import FORWARD_TIMEOUT, LEASE, RENEW, cluster_yaml
from helpers.markers import marker_to_native
from helpers.matrix import say, sync_until
from matrix.bridge_members import account_id, native_room, open_portal, wait_until
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    ghost_history,
    ghost_of,
    messages_from_others,
    nio_client,
    portal_with_native,
    room_history,
    wait_history,
)
from nacl.signing import SigningKey
from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    MemoryDownloadResponse,
    RoomSendResponse,
    UploadResponse,
)

from kalandra_core.client.bridge_invite import invite_content
from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.events import Message
from kalandra_core.proto import Frame
from kalandra_core.storage.sql import SqlStore

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio(loop_scope="module")]

COUNT = 5  # messages each way in each check
BRIDGE_NODE = "bridge"
OTHER_NODE = "node1"


class Cluster:
    """The bridge stack, the other node, and what the tests share."""

    def __init__(self, stack: BridgeStack, other: ServerProcess, alice: AsyncClient) -> None:
        self.stack = stack
        self.other = other
        self.alice = alice
        self.natives: list[Client] = []
        self.elsewhere: tuple[Client, bytes, str] | None = None  # native, room, its portal

    async def owner(self, room_id: bytes) -> str | None:
        store = await SqlStore.open(self.stack.store_url, migrate=False)
        try:
            return await store.lease_owner(room_id)
        finally:
            await store.close()

    async def native_on_other_node(self) -> Client:
        """A new native member (account made in the shared database) connected over TCP to
        the other node, not to the bridge's."""
        store = await SqlStore.open(self.stack.store_url, migrate=False)
        try:
            account = await store.create_member(f"native_{secrets.token_hex(3)}")
            token = await store.issue_token(account.member_id)
        finally:
            await store.close()
        core = ClientCore(account.member_id, bytes(SigningKey.generate()))
        # Both nodes' addresses, the other node's first: connected there, and to the bridge's
        # node once the other one is gone.
        bridge_node = ServerAddress("tcp", "127.0.0.1", self.stack.tcp_port)
        client = Client(core, [self.other.address("tcp"), bridge_node], token)
        await client.connect()
        await client.publish_key_packages(3)
        self.natives.append(client)
        return client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    work = tmp_path_factory.mktemp("bridge-cluster")
    options: dict[str, Any] = {
        "server.cluster.enabled": True,
        "server.cluster.node_name": BRIDGE_NODE,
        "server.cluster.lease_seconds": LEASE,
        "server.cluster.renew_seconds": RENEW,
        "server.cluster.forward_timeout": FORWARD_TIMEOUT,
        # The checks say which node serves which room: rooms stay where they are used.
        "server.cluster.rebalance": False,
    }
    async with bridge_stack(work, "postgres", options=options) as stack:
        # The bridge made the schema; the other node joins the same database.
        node_dir = work / OTHER_NODE
        await asyncio.to_thread(node_dir.mkdir)
        other = ServerProcess(
            node_dir, stack.database_url, server_yaml=cluster_yaml(OTHER_NODE, rebalance=False)
        )
        await asyncio.to_thread(other.start)
        try:
            async with nio_client(stack.synapse, stack.user) as alice:
                state = Cluster(stack, other, alice)
                try:
                    yield state
                finally:
                    for native in state.natives:
                        await native.close()
            # While it ran (its stop may refuse a late transaction, which is logged as one).
            logged = stack.log.read_text(errors="replace").splitlines()
        finally:
            other.stop()
            other.kill()
    problems = other.problems()
    assert not problems, "the other node logged errors:\n" + "\n".join(problems)
    errors = [line for line in logged if " ERROR " in line or " CRITICAL " in line]
    assert not errors, "the bridge logged errors:\n" + "\n".join(errors)


async def native_to_matrix(
    c: Cluster, native: Client, room_id: bytes, portal: str, prefix: str, before: int = 0
) -> None:
    """``native`` sends COUNT texts; alice sees them from its ghost, in order, each once (after
    the ``before`` texts the ghost sent there earlier)."""
    sent = [f"{prefix} {i}" for i in range(COUNT)]
    for text in sent:
        await asyncio.wait_for(native.send_text(room_id, text), 30)
    ghost = ghost_of(native)
    seen = await wait_history(c.alice, portal, ghost, before + COUNT)
    bodies = [body for _, body in seen]
    assert bodies[before:] == sent, bodies
    assert len(bodies) == len(set(bodies)), f"a message bridged twice: {bodies}"


async def matrix_to_native(
    c: Cluster,
    native: Client,
    room_id: bytes,
    portal: str,
    prefix: str,
    count: int = COUNT,
    midway: Callable[[], None] | None = None,
) -> None:
    """alice sends ``count`` texts in the portal; ``native`` receives and decrypts them, in
    order, each once. ``midway`` runs once ``native`` has the first two, the rest in flight."""
    sent = [f"{prefix} {i}" for i in range(count)]

    async def send_all() -> None:
        for text in sent:
            await say(c.alice, portal, text)

    sending = asyncio.create_task(send_all())
    got: list[Message] = []
    try:
        if midway is not None:
            await asyncio.wait_for(messages_from_others(native, got, 2, room_id), 60)
            midway()
        await asyncio.wait_for(messages_from_others(native, got, count, room_id), 60)
        await asyncio.wait_for(sending, 60)
    finally:
        sending.cancel()
    assert [m.content.body for m in got] == sent
    # From alice's bridged member (neither the native member nor the bot's relay).
    bot = await account_id(c.stack, "kalandrabot")
    senders = {m.sender_id for m in got}
    assert len(senders) == 1, senders
    assert senders.isdisjoint({bot, native.core.member_id}), senders
    # Nothing more came (no copy sent twice): a marker behind them, in the portal's order.
    _, extra = await marker_to_native(c.alice, portal, native, room_id)
    assert extra == [], [m.content.body for m in extra]


async def test_the_other_node_names_the_bridge(cluster: Cluster) -> None:
    """Native members add the bridge to a room by what their server names in HelloReply
    (`kalandra invite ROOM bridge`): a client of the other node is told the same as one of the
    bridge's node."""
    c = cluster
    native = await c.native_on_other_node()
    bot = await account_id(c.stack, "kalandrabot")
    assert (native.core.bridge_member_id, native.core.bridge_mxid) == (bot, BOT)

    # What `kalandra invite ROOM bridge`, then `kalandra invite ROOM @alice` do: the portal is
    # made for alice's invitation, read by the bot in the room's log (owned by the other node).
    room_id = await native_room(native, bot, "invited through")  # bot: as HelloReply named it
    assert await c.owner(room_id) == OTHER_NODE
    invites: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == c.alice.user_id and event.membership == "invite":
            invites.append(room.room_id)

    c.alice.add_event_callback(on_invite, InviteMemberEvent)
    await c.alice.sync(timeout=0)
    await native.send(room_id, invite_content(c.alice.user_id))
    await sync_until(c.alice, lambda: bool(invites), "the invitation", 60)
    portal = invites[-1]
    await c.alice.join(portal)
    await sync_until(c.alice, lambda: portal in c.alice.rooms, "the join")
    await wait_until(lambda: roster_of(native, room_id, 3), "alice's bridged member in the room")
    await native_to_matrix(c, native, room_id, portal, "after the invitation")
    await matrix_to_native(c, native, room_id, portal, "answer to the invitation")


async def roster_of(native: Client, room_id: bytes, size: int) -> bool:
    return len(native.core.rooms[room_id].roster()) == size


async def test_a_portal_of_a_room_the_other_node_owns(cluster: Cluster) -> None:
    c = cluster
    native = await c.native_on_other_node()
    room_id = await native_room(native, await account_id(c.stack, "kalandrabot"), "elsewhere")
    assert await c.owner(room_id) == OTHER_NODE  # created through the other node
    portal = await open_portal(c.alice, room_id)

    # alice's bridged member is added by the bot's commit (forwarded to the other node).
    await wait_until(lambda: roster_of(native, room_id, 3), "alice's bridged member in the room")
    await native_to_matrix(c, native, room_id, portal, "from the other node")
    await matrix_to_native(c, native, room_id, portal, "to the other node")
    assert await c.owner(room_id) == OTHER_NODE  # served there all along
    c.elsewhere = (native, room_id, portal)


async def test_media_both_ways_in_the_other_nodes_room(cluster: Cluster) -> None:
    """Encrypted blocks uploaded through one node are read through the other: the native
    member's file reaches alice through the bridge's node, and alice's reaches the native member
    through the other node."""
    c = cluster
    assert c.elsewhere is not None, "runs after the test of that portal"
    native, room_id, portal = c.elsewhere
    out = os.urandom(600 * 1024)  # several blocks
    ref = await native.upload_media(room_id, out, mimetype="application/pdf", name="out.pdf")
    await native.send(room_id, Content(body="out.pdf", kind="file", media=ref))

    async def file_event() -> dict[str, Any] | None:
        for event in await room_history(c.alice, portal):
            if event.source.get("sender") == ghost_of(native):
                content: dict[str, Any] = event.source.get("content", {})
                if content.get("msgtype") == "m.file" and content.get("body") == "out.pdf":
                    return content
        return None

    content = await wait_until(file_event, "the native member's file in the portal")
    downloaded = await c.alice.download(mxc=content["url"])
    assert isinstance(downloaded, MemoryDownloadResponse), downloaded
    assert downloaded.body == out

    data = os.urandom(600 * 1024)
    uploaded, _ = await c.alice.upload(
        io.BytesIO(data), content_type="application/zip", filename="in.zip", filesize=len(data)
    )
    assert isinstance(uploaded, UploadResponse), uploaded
    info = {"mimetype": "application/zip", "size": len(data)}
    file = {"msgtype": "m.file", "body": "in.zip", "url": uploaded.content_uri, "info": info}
    sent = await c.alice.room_send(portal, "m.room.message", file)
    assert isinstance(sent, RoomSendResponse), sent
    got: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, got, 1, room_id), 60)
    media = got[0].content.media
    assert media is not None
    assert (got[0].content.kind, media.name, media.size) == ("file", "in.zip", len(data))
    assert await asyncio.wait_for(native.download_media(room_id, media), 60) == data
    assert await c.owner(room_id) == OTHER_NODE


async def test_a_portal_of_a_room_the_bridges_node_owns(cluster: Cluster) -> None:
    c = cluster
    native = await c.native_on_other_node()
    room_hex, portal = await portal_with_native(c.alice, native, f"here {secrets.token_hex(2)}")
    room_id = bytes.fromhex(room_hex)
    assert await c.owner(room_id) == BRIDGE_NODE  # created by the bot
    await native_to_matrix(c, native, room_id, portal, "into the bridge's node")
    await matrix_to_native(c, native, room_id, portal, "out of the bridge's node")
    assert await c.owner(room_id) == BRIDGE_NODE


async def test_the_other_node_killed_while_it_owns_a_portals_room(cluster: Cluster) -> None:
    c = cluster
    assert c.elsewhere is not None, "runs after the test of that portal"
    native, room_id, portal = c.elsewhere  # native is on the other node, in that room
    assert await c.owner(room_id) == OTHER_NODE
    earlier = len(await ghost_history(c.alice, portal, ghost_of(native)))
    killed_at = 0.0

    def kill() -> None:
        nonlocal killed_at
        killed_at = time.monotonic()
        c.other.kill()  # the native client moves on to its other address, the bridge's node

    # Killed while alice's messages are on their way: the bot's frames for the room go
    # unanswered, then the bridge's node takes the room once the lease ran out; alice's
    # messages arrive, in order, once each.
    await matrix_to_native(c, native, room_id, portal, "across the kill", 2 * COUNT, kill)
    print(
        f"kill -9 to alice's last message decrypted by the native client: "
        f"{time.monotonic() - killed_at:.2f} s (lease {LEASE} s)"
    )
    assert await c.owner(room_id) == BRIDGE_NODE
    assert native.address.port == c.stack.tcp_port
    text = c.stack.log.read_text(errors="replace")
    assert f"room {room_id.hex()}: lease taken (token 2)" in text
    await native_to_matrix(c, native, room_id, portal, "native after the kill", earlier)

    # The room's log across the switch: dense, no request numbered twice.
    store = await SqlStore.open(c.stack.store_url, migrate=False)
    try:
        log = [Frame.decode(f.encode()) for f in await store.load_frames(room_id, 0, 100_000)]
    finally:
        await store.close()
    assert_dense(log)
    requests = [(f.header.sender_id, f.header.request_id) for f in log if f.header.request_id]
    assert len(requests) == len(set(requests)), "a request was numbered twice"
