"""A crash of the server process (SIGKILL mid-traffic) loses no acknowledged frame and leaves
no hole in the log: clients reconnect by themselves, their outboxes resend what the log does
not show, and a full sync afterwards shows every acknowledged frame exactly once."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator

import pytest
from acceptance.acceptance_harness import (
    Harness,
    ServerProcess,
    assert_dense,
    failures,
    running_server,
    shared_room,
)
from helpers.native import within

from kalandra_core.client.driver import Client, ClientError
from kalandra_core.proto import Opcode

BURST = 6  # messages per client and phase, all in flight at once
RECOVERY_TIMEOUT = 60.0  # restart + reconnect with backoff, on a loaded machine


def drained(client: Client) -> bool:
    return not client.core.outbox


@pytest.fixture
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Its own server process per test: this test kills it."""
    with running_server(tmp_path_factory.mktemp("crash-server"), database) as proc:
        yield proc


async def test_kill_and_restart_loses_nothing(harness: Harness) -> None:
    # A crashed server sends nothing (QUIC has no FIN): the keepalive notices, within ~2 s.
    harness.keepalive = 1.0
    alice, bob = await harness.users("alice", "bob")
    a = await harness.connect(alice)
    b = await harness.connect(bob)
    room = await shared_room(harness, a, (b, bob))

    acked: dict[str, tuple[int, int]] = {}  # body -> (sender, log index), acknowledged only
    unacked: list[str] = []

    def burst(phase: str) -> dict[str, tuple[Client, asyncio.Task[int]]]:
        return {
            body: (client, asyncio.create_task(client.send_text(room, body)))
            for client, name in ((a, "a"), (b, "b"))
            for body in (f"{phase}-{name}{i}" for i in range(BURST))
        }

    async def outcome(sends: dict[str, tuple[Client, asyncio.Task[int]]]) -> None:
        tasks = [task for _, task in sends.values()]
        results = await within(asyncio.gather(*tasks, return_exceptions=True), RECOVERY_TIMEOUT)
        for (body, (client, _)), result in zip(sends.items(), results, strict=True):
            if isinstance(result, ClientError | TimeoutError):
                unacked.append(body)  # the connection dropped under it: not acknowledged
            elif isinstance(result, BaseException):
                raise result
            else:
                acked[body] = (client.core.member_id, result)

    await outcome(before := burst("before"))
    assert set(acked) == set(before)

    crashed = burst("crash")
    for _ in range(3):  # let the frames reach the sockets, then crash with them in flight
        await asyncio.sleep(0)
    harness.server.kill()
    await harness.server.restart()  # same database, same ports
    after = burst("after")  # while the clients may still be reconnecting
    await outcome(crashed)
    await outcome(after)
    assert harness.server.starts == 2

    # Whatever was not acknowledged stays in the outboxes until the log shows it.
    for client in (a, b):
        await within(client.wait_for(functools.partial(drained, client)), RECOVERY_TIMEOUT)
        await within(client.settle())

    raw = await harness.raw(alice, a.core.signing_key)
    log = await raw.sync_all(alice.member_id, room)
    assert_dense(log)
    messages = [f for f in log if f.header.opcode == Opcode.APP_MESSAGE]
    sent_by = [(f.header.sender_id, f.header.request_id) for f in messages]
    assert len(set(sent_by)) == len(sent_by), "a frame was sequenced twice"
    by_index = {f.header.context_id: f for f in log}
    for body, (member_id, index) in acked.items():
        frame = by_index[index]
        assert frame.header.opcode == Opcode.APP_MESSAGE, body
        assert frame.header.sender_id == member_id, body

    # B read the whole log, in order: every acknowledged body exactly once, at its index.
    await within(b.wait_for(lambda: b.core.rooms[room].last_seen == len(log) - 1))
    read: dict[int, tuple[int, str]] = {}
    while not b.messages.empty():
        m = b.messages.get_nowait()
        read[m.log_index] = (m.sender_id, m.content.body)
    assert sorted(read) == sorted(f.header.context_id for f in messages)
    bodies = [body for _, body in read.values()]
    assert len(set(bodies)) == len(bodies), "a message was delivered twice"
    for body, (member_id, index) in acked.items():
        assert read[index] == (member_id, body)
    # Unacknowledged messages were resent by the outbox: all of them are in the log too.
    assert set(bodies) == set(acked) | set(unacked)
    final = [await within(client.send_text(room, "final")) for client in (a, b)]
    assert final == [len(log), len(log) + 1]
    for client in (a, b):
        assert failures(client) == []
