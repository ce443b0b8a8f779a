"""One member drains another's KeyPackages over raw TCP frames: the directory rate-limits the
requester, and once the ordinary KeyPackages are gone it keeps handing out the last-resort one
(RFC 9420 section 16.8), so the real client library can still invite the drained member. On
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kalandra_core.client.content import Content
from kalandra_core.mls._lib import KeyPackage
from kalandra_core.mls.keypackage import bundle_is_last_resort, is_last_resort
from kalandra_core.proto import ErrorCode, Opcode
from kalandra_core.server.app import RunningServer, start_server
from security.conftest import server_config
from security.hostile import TIMEOUT, account, client, error_of, raw, rows

BURST = 5  # KeyPackage fetches a requester may make at once in this test
NORMAL = 3  # ordinary KeyPackages the victim publishes (plus its last-resort one)


@pytest.fixture
async def server(db_url: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    config = server_config(tmp_path, database=db_url)
    config.limits.key_package_fetch_burst = BURST
    config.limits.key_package_fetch_per_second = 0.01  # nothing refills during the test
    running = await start_server(config)
    try:
        yield running
    finally:
        await running.close()


async def test_a_member_who_drains_key_packages_is_rate_limited_and_the_victim_stays_invitable(
    server: RunningServer,
) -> None:
    url = server.hub.config.database
    alice, bob, mallory = [await account(server, n) for n in ("alice", "bob", "mallory")]
    victim = await client(server, alice)
    assert await victim.publish_key_packages(NORMAL) == NORMAL  # and one last-resort package
    assert len((await rows(url))["last_resort_key_packages"]) == 1

    conn = await raw(server, hello_as=mallory)
    fetches = [
        conn.send(Opcode.KEY_PACKAGE, account=mallory, context=alice.member_id, sign=False)
        for _ in range(BURST + 2)
    ]
    answers = await conn.replies(fetches)
    got = [answers[rid] for rid in fetches[:BURST]]
    assert [f.header.opcode for f in got] == [Opcode.KEY_PACKAGE] * BURST
    packages = [f.payload for f in got]
    assert len(set(packages[:NORMAL])) == NORMAL
    # The ordinary ones are gone; the last-resort one comes again and again, never consumed.
    assert packages[NORMAL:] == [packages[NORMAL]] * (BURST - NORMAL)
    assert is_last_resort(KeyPackage.deserialize(packages[NORMAL]))
    assert not any(is_last_resort(KeyPackage.deserialize(p)) for p in packages[:NORMAL])
    for rid in fetches[BURST:]:
        refused = error_of(answers[rid])
        assert refused.code == ErrorCode.RATE_LIMITED
        assert refused.retry_after is not None
        assert refused.retry_after >= 1
    assert await server.store.key_package_count(alice.member_id) == 0
    assert len((await rows(url))["last_resort_key_packages"]) == 1

    # Bob (his own allowance) invites alice after the drain: he gets the last-resort package,
    # alice joins with it, reads the room, and keeps its private keys for the next time.
    inviter = await client(server, bob)
    room_id = await inviter.create_room(name="after the drain")
    await inviter.invite(room_id, [alice.member_id])
    assert await asyncio.wait_for(victim.joined.get(), TIMEOUT) == room_id
    await inviter.send(room_id, Content(body="still reachable"))
    message = await asyncio.wait_for(victim.messages.get(), TIMEOUT)
    assert message.content.body == "still reachable"
    assert any(bundle_is_last_resort(b) for b in victim.core.bundles.values())
    assert len((await rows(url))["last_resort_key_packages"]) == 1
    for c in (victim, inviter):
        await c.close()
    conn.close()
