"""The Store contract on every backend: SqlStore on real SQLite and PostgreSQL, and MemoryStore.

Tests that look at the database behind the store's back, open a second store on the same
database or reopen it take ``sql_store`` (the SQL engines only) instead of ``store``."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TypeVar

import pytest
import sqlalchemy as sa
from integration.store_helpers import (
    APP,
    COMMIT,
    HIGH,
    MID,
    OWNER,
    SQL_ENGINES,
    entries,
    entry,
    new_room,
    room_id,
    state_of,
)
from sqlalchemy.ext.asyncio import create_async_engine

from kalandra_core.proto import Handshake
from kalandra_core.storage import (
    AlreadyExists,
    AppendConflict,
    BanRecord,
    LogEntry,
    MediaPut,
    NotFound,
    OverQuota,
    Role,
    Room,
    RoomChanges,
    RoomMember,
    SqlStore,
    StoreError,
)
from kalandra_core.storage import schema as db
from kalandra_core.storage.base import Store
from kalandra_core.storage.memory import MemoryStore
from kalandra_core.storage.urls import VERSION_TABLE, sqlalchemy_url

T = TypeVar("T")


@pytest.fixture(params=[*SQL_ENGINES, "memory"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """The fresh database of the store under test; None for MemoryStore."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[Store]:
    if store_url is None:
        yield MemoryStore()
        return
    s = await SqlStore.open(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def sql_store(db_url: str) -> AsyncIterator[SqlStore]:
    s = await SqlStore.open(db_url)
    try:
        yield s
    finally:
        await s.close()


async def raw(url: str, fn: Callable[[sa.Connection], T]) -> T:
    """Look at the database behind the store's back, on a connection of our own."""
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def stored_token_hashes(store: Store, url: str | None) -> set[bytes]:
    """What the store keeps of its tokens, looked at behind its back."""
    if isinstance(store, MemoryStore):
        return set(store._tokens)
    assert url is not None
    rows = await raw(url, lambda c: c.execute(sa.select(db.device_tokens.c.token_hash)).all())
    return {bytes(r[0]) for r in rows}


async def test_schema_module_matches_migrations(sql_store: SqlStore, db_url: str) -> None:
    def reflect(conn: sa.Connection) -> dict[str, tuple[set[str], set[str], set[str]]]:
        insp = sa.inspect(conn)
        out = {}
        for table in insp.get_table_names():
            cols = {c["name"]: c["nullable"] for c in insp.get_columns(table)}
            pk = set(insp.get_pk_constraint(table)["constrained_columns"])
            out[table] = (set(cols), pk, {name for name, null in cols.items() if null})
        return out

    live = await raw(db_url, reflect)
    # bridge_* tables (alembic 0003) are the bridge's (bridge/db/), not the homeserver's.
    ours = {
        t
        for t in live
        if t not in {"schema_info", VERSION_TABLE, "sqlite_sequence"}
        and not t.startswith("bridge_")
    }
    assert ours == set(db.metadata.tables)
    for table in db.metadata.sorted_tables:
        columns, pk, nullable = live[table.name]
        assert columns == {c.name for c in table.columns}, table.name
        assert pk == {c.name for c in table.primary_key}, table.name
        assert nullable == {c.name for c in table.columns if c.nullable}, table.name


async def test_members(store: Store) -> None:
    alice = await store.create_member("alice")
    assert 0 < alice.member_id < 1 << 64
    assert alice.signature_key is None
    with pytest.raises(AlreadyExists):
        await store.create_member("alice")
    bob = await store.create_member("bob")
    assert await store.get_member(alice.member_id) == alice
    assert await store.find_member("bob") == bob
    assert await store.find_member("carol") is None
    assert await store.get_member(12345) is None
    assert [m.name for m in await store.list_members()] == ["alice", "bob"]
    await store.set_signature_key(bob.member_id, b"\x01" * 32)
    assert await store.get_member(bob.member_id) == replace(bob, signature_key=b"\x01" * 32)
    with pytest.raises(NotFound):
        await store.set_signature_key(12345, b"k")


async def test_member_ids_above_2_63_round_trip(store: Store) -> None:
    # Ids are random; half of them are >= 2**63. 64 tries make a miss impossible in practice.
    for n in range(64):
        account = await store.create_member(f"m{n}")
        if account.member_id >= MID:
            break
    assert account.member_id >= MID
    assert await store.get_member(account.member_id) == account
    token = await store.issue_token(account.member_id)
    assert await store.authenticate(token) == account.member_id
    assert await store.publish_key_packages(account.member_id, [b"kp"]) == 1
    # Ids at both edges of the signed range, everywhere a member id is stored.
    rid = await new_room(store)
    edge = RoomMember(MID, Role.MODERATOR, 7)
    ban = BanRecord(MID - 1, HIGH, "spam", None)
    await store.append(
        rid, [entry(0, sender=MID)], RoomChanges(upsert_members=[edge], set_bans=[ban])
    )
    state = await state_of(store, rid)
    assert state.room.creator == HIGH
    assert state.members == {HIGH: OWNER, MID: edge}
    assert state.bans == {MID - 1: ban}
    assert (await store.load_frames(rid, 0, 1))[0].sender_id == MID
    assert await store.rooms_of(HIGH) == [rid] == await store.rooms_of(MID)
    await store.put_welcome(rid, HIGH, b"w")
    assert [w.recipient_id for w in await store.pending_welcomes(HIGH)] == [HIGH]


async def test_tokens(store: Store, store_url: str | None) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    t1, t2 = await store.issue_token(alice), await store.issue_token(alice)
    tb = await store.issue_token(bob)
    assert len({t1, t2, tb}) == 3
    assert len(t1) >= 43
    assert await store.authenticate(t1) == alice
    assert await store.authenticate(t2) == alice
    assert await store.authenticate(tb) == bob
    assert await store.authenticate("not-a-token") is None
    assert await store.authenticate("") is None
    assert await stored_token_hashes(store, store_url) == {
        hashlib.sha256(t.encode()).digest() for t in (t1, t2, tb)
    }
    assert await store.revoke_tokens(alice) == 2
    assert await store.authenticate(t1) is None
    assert await store.authenticate(t2) is None
    assert await store.authenticate(tb) == bob
    assert await store.revoke_tokens(alice) == 0
    t3 = await store.issue_token(alice)
    assert await store.authenticate(t3) == alice
    with pytest.raises(NotFound):
        await store.issue_token(12345)


async def test_login_codes_are_single_use_hashed_and_expire(
    store: Store, store_url: str | None
) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    code = await store.issue_login_code(alice)
    assert re.fullmatch(r"klc_[a-z2-7]{21}", code)  # 105 random bits, short enough to type
    second = await store.issue_login_code(alice)
    assert second != code
    now = int(time.time() * 1000)
    # Case, spaces and dashes are forgiven; the second redemption finds nothing.
    typed = code[:9].upper() + "-" + code[9:17] + " " + code[17:]
    assert await store.redeem_login_code(typed, now) == alice
    assert await store.redeem_login_code(code, now) is None
    assert await store.redeem_login_code("klc_" + "a" * 21, now) is None
    assert await store.redeem_login_code("not-a-code", now) is None
    # Expiry is checked against the clock passed in; an expired code is gone too.
    short = await store.issue_login_code(bob, ttl_seconds=60, now_ms=now)
    assert await store.redeem_login_code(short, now + 60_000) is None
    assert await store.redeem_login_code(short, now) is None
    fresh = await store.issue_login_code(bob, ttl_seconds=60, now_ms=now)
    assert await store.redeem_login_code(fresh, now + 59_999) == bob
    # Only hashes are stored; the plaintext is nowhere.
    kept = await store.issue_login_code(alice)
    if isinstance(store, MemoryStore):
        hashes = set(store._login_codes)
    else:
        assert store_url is not None
        rows = await raw(store_url, lambda c: c.execute(sa.select(db.login_codes)).all())
        hashes = {bytes(r.code_hash) for r in rows}
        assert all(kept.encode() not in bytes(r.code_hash) for r in rows)
    assert hashes == {hashlib.sha256(c.encode()).digest() for c in (second, kept)}
    # Concurrent redemptions of one code: exactly one wins.
    contested = await store.issue_login_code(alice)
    won = await asyncio.gather(*(store.redeem_login_code(contested, now) for _ in range(4)))
    assert sorted(won, key=str) == [alice, None, None, None]
    with pytest.raises(ValueError, match="seconds"):
        await store.issue_login_code(alice, ttl_seconds=601)
    with pytest.raises(NotFound):
        await store.issue_login_code(12345)


async def test_rooms(store: Store) -> None:
    rid = await new_room(store, handshake=Handshake.PRIVATE, group_id=b"g", name="n", topic="t")
    with pytest.raises(AlreadyExists):
        await new_room(store)
    with pytest.raises(ValueError, match="16 bytes"):
        await store.create_room(Room(b"short", 0, 0, HIGH, 0), OWNER)
    state = await state_of(store, rid)
    assert state.room == Room(
        rid, 0, 0, HIGH, 1_700_000_000_000, Handshake.PRIVATE, b"g", "n", "t"
    )
    assert state.members == {HIGH: OWNER}
    assert state.bans == {}
    assert await store.load_room(room_id(99)) is None
    other = await new_room(store, 2)
    assert await store.rooms_of(HIGH) == [rid, other]
    assert await store.rooms_of(5) == []
    await store.update_room_metadata(rid, name="new", topic="")
    state = await state_of(store, rid)
    assert (state.room.name, state.room.topic) == ("new", "")
    with pytest.raises(NotFound):
        await store.update_room_metadata(room_id(99), name="x", topic="y")


async def test_log_heads_are_each_rooms_next_index(store: Store) -> None:
    # What the bridge reads at its start: which log entries an earlier process may have seen.
    before = await store.log_heads()
    rid, other = await new_room(store, 7), await new_room(store, 8)
    await store.append(rid, entries(0, 3))
    heads = await store.log_heads()
    assert (heads[rid], heads[other]) == (3, 0)
    assert heads.keys() - before.keys() == {rid, other}


async def test_append_is_strict_and_dense(store: Store) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 3))
    with pytest.raises(AppendConflict) as gap:
        await store.append(rid, entries(5, 1))
    assert (gap.value.expected, gap.value.got) == (3, 5)
    with pytest.raises(AppendConflict) as dup:
        await store.append(rid, entries(2, 2))
    assert (dup.value.expected, dup.value.got) == (3, 2)
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(3), entry(5)])  # a hole inside the batch
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(3), entry(3)])
    with pytest.raises(NotFound):
        await store.append(room_id(99), entries(0, 1))
    # Nothing of the rejected batches was written.
    frames = await store.load_frames(rid, 0, 100)
    assert [f.log_index for f in frames] == [0, 1, 2]
    assert [f.payload for f in frames] == [b"payload-0", b"payload-1", b"payload-2"]
    state = await state_of(store, rid)
    assert state.room.next_log_index == 3
    await store.append(rid, entries(3, 2))
    assert [f.log_index for f in await store.load_frames(rid, 0, 100)] == [0, 1, 2, 3, 4]


async def test_load_frames_ranges(store: Store) -> None:
    rid = await new_room(store)
    assert await store.load_frames(rid, 0, 10) == []  # empty room: empty, not an error
    batch = entries(0, 10, sender=MID)
    await store.append(rid, batch)
    frames = await store.load_frames(rid, 3, 4)
    assert [f.log_index for f in frames] == [3, 4, 5, 6]
    f = frames[0]
    assert (f.room_id, f.opcode, f.sender_id, f.epoch) == (rid, APP, MID, 0)
    assert f.encode() == batch[3].header + batch[3].payload
    assert [x.log_index for x in await store.load_frames(rid, 8, 100)] == [8, 9]
    assert await store.load_frames(rid, 10, 5) == []
    assert await store.load_frames(rid, 0, 0) == []
    assert await store.load_frames(room_id(99), 0, 5) == []


async def test_room_changes_commit_with_the_append(store: Store) -> None:
    rid = await new_room(store)
    bob, carol = RoomMember(2, Role.MEMBER, 1), RoomMember(3, Role.MEMBER, 2)
    await store.append(rid, entries(0, 1), RoomChanges(upsert_members=[bob, carol]))
    bob2, dave = RoomMember(2, Role.MODERATOR, 1), RoomMember(4, Role.MEMBER, 3)
    ban = BanRecord(3, HIGH, "spam", 1_800_000_000_000)
    changes = RoomChanges(1, 2, upsert_members=[bob2, dave], remove_members=[3], set_bans=[ban])
    await store.append(rid, [entry(1), entry(2, opcode=COMMIT)], changes)
    state = await state_of(store, rid)
    assert (state.room.epoch, state.room.next_log_index) == (1, 3)
    assert state.members == {HIGH: OWNER, 2: bob2, 4: dave}
    assert state.bans == {3: ban}
    assert [f.log_index for f in await store.commits_between(rid, 0, 1)] == [2]
    # BanRecord replaced, then lifted; a member removed and re-added in one batch ends up present.
    await store.append(
        rid, entries(3, 1, epoch=1), RoomChanges(set_bans=[BanRecord(3, 2, "again", None)])
    )
    state = await state_of(store, rid)
    assert state.bans == {3: BanRecord(3, 2, "again", None)}
    again = RoomChanges(
        lift_bans=[3], remove_members=[4], upsert_members=[RoomMember(4, Role.MEMBER, 9)]
    )
    await store.append(rid, entries(4, 1, epoch=1), again)
    state = await state_of(store, rid)
    assert state.bans == {}
    assert state.members[4] == RoomMember(4, Role.MEMBER, 9)


async def test_changes_without_frames(store: Store) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 2))
    await store.append(rid, [], RoomChanges(upsert_members=[RoomMember(5, Role.MEMBER, None)]))
    state = await state_of(store, rid)
    assert state.members[5] == RoomMember(5, Role.MEMBER, None)
    assert state.room.next_log_index == 2
    await store.append(rid, [])  # nothing at all: a no-op
    with pytest.raises(NotFound):
        await store.append(room_id(99), [], RoomChanges(remove_members=[5]))
    with pytest.raises(ValueError, match="not in this batch"):
        await store.append(rid, [], RoomChanges(commit_log_index=2))
    await store.append(rid, entries(2, 1))


async def test_failed_append_writes_nothing_at_all(store: Store) -> None:
    rid = await new_room(store)
    await store.append(rid, entries(0, 1))
    before = await store.load_room(rid)
    # A conflict with changes attached: neither frames nor changes land.
    changes = RoomChanges(1, 5, upsert_members=[RoomMember(2, Role.MEMBER, 1)])
    with pytest.raises(AppendConflict):
        await store.append(rid, [entry(5, opcode=COMMIT)], changes)
    # A failure in the last statement of the transaction (a ban id that is no u64) rolls back
    # the claimed range, the frames, the epoch and the commit index with it.
    bad = RoomChanges(
        new_epoch=1, commit_log_index=1, set_bans=[BanRecord(1 << 64, HIGH, "", None)]
    )
    secret = LogEntry(1, COMMIT, HIGH, 0, b"\x00" * 128, b"secret-payload")
    with pytest.raises(StoreError) as failed:
        await store.append(rid, [secret], bad)
    assert "not a u64" in str(failed.value.__cause__)
    assert "secret-payload" not in str(failed.value.__cause__)  # parameters stay out of messages
    assert await store.load_room(rid) == before
    assert [f.log_index for f in await store.load_frames(rid, 0, 10)] == [0]
    assert await store.commits_between(rid, 0, 10) == []
    with pytest.raises(ValueError, match="not in this batch"):
        await store.append(rid, entries(1, 1), RoomChanges(commit_log_index=0))
    await store.append(rid, [entry(1, opcode=COMMIT)], RoomChanges(1, 1))


async def test_concurrent_appends_exactly_one_wins(sql_store: SqlStore, db_url: str) -> None:
    rid = await new_room(sql_store)
    other = await SqlStore.open(db_url)
    try:
        for start in range(0, 40, 4):  # several rounds, each a race for the same index
            mine, theirs = entries(start, 4, sender=1), entries(start, 4, sender=2)
            results = await asyncio.gather(
                sql_store.append(rid, mine), other.append(rid, theirs), return_exceptions=True
            )
            winners = [r for r in results if r is None]
            losers = [r for r in results if isinstance(r, AppendConflict)]
            assert len(winners) == 1, results
            assert len(losers) == 1, results
            won = mine if results[0] is None else theirs
            stored = await other.load_frames(rid, start, 4)
            assert [(f.sender_id, f.payload) for f in stored] == [
                (e.sender_id, e.payload) for e in won
            ]
        state = await state_of(sql_store, rid)
        assert state.room.next_log_index == 40
    finally:
        await other.close()


async def test_redaction_keeps_the_header(store: Store) -> None:
    rid = await new_room(store)
    batch = entries(0, 3)
    await store.append(rid, batch)
    assert await store.redact(rid, 1) is True
    frames = await store.load_frames(rid, 0, 3)
    assert [f.payload for f in frames] == [b"payload-0", None, b"payload-2"]
    assert frames[1].header == batch[1].header
    assert frames[1].encode() == batch[1].header
    assert await store.redact(rid, 1) is True  # still a frame, already redacted
    assert await store.redact(rid, 3) is False
    assert await store.redact(room_id(99), 0) is False
    await store.append(rid, entries(3, 1))  # the order is untouched


async def test_commits_between(store: Store) -> None:
    rid = await new_room(store)
    index = 0
    commit_at: dict[int, int] = {}
    for epoch in range(4):
        await store.append(rid, entries(index, 2, epoch=epoch))
        index += 2
        commit_at[epoch] = index
        changes = RoomChanges(new_epoch=epoch + 1, commit_log_index=index)
        await store.append(rid, [entry(index, epoch=epoch, opcode=COMMIT)], changes)
        index += 1
    await store.redact(rid, commit_at[3])

    async def between(a: int, b: int) -> list[int]:
        return [f.log_index for f in await store.commits_between(rid, a, b)]

    assert await between(0, 4) == [commit_at[e] for e in range(4)]
    assert await between(1, 3) == [commit_at[1], commit_at[2]]
    assert await between(2, 3) == [commit_at[2]]
    assert await between(4, 9) == []
    assert await between(3, 3) == []
    assert await between(3, 1) == []
    frames = await store.commits_between(rid, 2, 4)
    assert [(f.opcode, f.epoch) for f in frames] == [(COMMIT, 2), (COMMIT, 3)]
    assert frames[0].payload == b"payload-%d" % commit_at[2]
    assert frames[1].payload is None  # redacted commits still come back, header only
    state = await state_of(store, rid)
    assert state.room.epoch == 4


async def test_welcome_mailbox(store: Store) -> None:
    rid = await new_room(store)
    w1 = await store.put_welcome(rid, HIGH, b"welcome-1")
    w2 = await store.put_welcome(rid, HIGH, b"welcome-2")
    w3 = await store.put_welcome(rid, 7, b"welcome-3")
    assert len({w1, w2, w3}) == 3
    pending = await store.pending_welcomes(HIGH)
    assert [(w.welcome_id, w.room_id, w.recipient_id, w.frame) for w in pending] == [
        (w1, rid, HIGH, b"welcome-1"),
        (w2, rid, HIGH, b"welcome-2"),
    ]
    assert [w.frame for w in await store.pending_welcomes(7)] == [b"welcome-3"]
    assert await store.pending_welcomes(8) == []
    await store.welcome_delivered(w1)
    await store.welcome_delivered(w1)  # acknowledging twice is harmless
    assert [w.welcome_id for w in await store.pending_welcomes(HIGH)] == [w2]
    w4 = await store.put_welcome(rid, HIGH, b"welcome-4")
    assert w4 not in {w1, w2, w3}  # ids are never reused
    with pytest.raises(NotFound):
        await store.put_welcome(room_id(99), HIGH, b"w")


async def test_key_packages(store: Store) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    assert await store.key_package_count(alice) == 0
    assert await store.take_key_package(alice) is None
    assert await store.publish_key_packages(alice, [b"a", b"b", b"c"]) == 3
    assert await store.publish_key_packages(alice, [b"b", b"d", b"d"]) == 4  # duplicates ignored
    assert await store.publish_key_packages(alice, []) == 4
    assert await store.publish_key_packages(bob, [b"a"]) == 1  # unique per member only
    taken = [await store.take_key_package(alice) for _ in range(5)]
    assert taken == [b"a", b"b", b"c", b"d", None]
    assert await store.key_package_count(alice) == 0
    assert await store.key_package_count(bob) == 1
    assert await store.publish_key_packages(alice, [b"a"]) == 1  # a taken one may come back
    with pytest.raises(NotFound):
        await store.publish_key_packages(12345, [b"x"])


async def test_last_resort_key_package_is_given_when_none_is_left_and_kept(store: Store) -> None:
    alice, bob = [(await store.create_member(n)).member_id for n in ("alice", "bob")]
    await store.set_last_resort_key_package(alice, b"last-1")
    await store.set_last_resort_key_package(alice, b"last-2")  # replaces the older one
    assert await store.publish_key_packages(alice, [b"a"]) == 1  # not counted
    assert await store.take_key_package(alice) == b"a"
    assert await store.take_key_package(alice) == b"last-2"
    assert await store.take_key_package(alice) == b"last-2"  # not consumed
    assert await store.key_package_count(alice) == 0
    assert await store.take_key_package(bob) is None
    with pytest.raises(NotFound):
        await store.set_last_resort_key_package(12345, b"x")


async def test_concurrent_takes_get_different_key_packages(
    sql_store: SqlStore, db_url: str
) -> None:
    alice = (await sql_store.create_member("alice")).member_id
    await sql_store.publish_key_packages(alice, [b"kp-%d" % i for i in range(6)])
    other = await SqlStore.open(db_url)
    try:
        taken = await asyncio.gather(*(s.take_key_package(alice) for s in (sql_store, other) * 3))
    finally:
        await other.close()
    assert sorted(t for t in taken if t is not None) == [b"kp-%d" % i for i in range(6)]
    assert await sql_store.key_package_count(alice) == 0


async def test_group_info(store: Store) -> None:
    rid = await new_room(store)
    assert await store.get_group_info(rid) is None
    await store.put_group_info(rid, 1, b"gi-1")
    assert await store.get_group_info(rid) == (1, b"gi-1")
    await store.put_group_info(rid, 3, b"gi-3")
    await store.put_group_info(rid, 2, b"gi-2")  # older than what we have: ignored
    assert await store.get_group_info(rid) == (3, b"gi-3")
    await store.put_group_info(rid, 3, b"gi-3b")
    assert await store.get_group_info(rid) == (3, b"gi-3b")
    with pytest.raises(NotFound):
        await store.put_group_info(room_id(99), 1, b"x")


async def test_reopen_keeps_everything(db_url: str) -> None:
    store = await SqlStore.open(db_url)
    alice = await store.create_member("alice")
    token = await store.issue_token(alice.member_id)
    rid = await new_room(store)
    await store.append(rid, [entry(0, opcode=COMMIT)], RoomChanges(1, 0))
    await store.append(rid, entries(1, 2, epoch=1))
    await store.redact(rid, 2)
    welcome = await store.put_welcome(rid, alice.member_id, b"w")
    await store.publish_key_packages(alice.member_id, [b"k1", b"k2"])
    await store.put_group_info(rid, 1, b"gi")
    state = await store.load_room(rid)
    await store.close()

    for migrate in (True, False):
        store = await SqlStore.open(db_url, migrate=migrate)
        try:
            assert await store.get_member(alice.member_id) == alice
            assert await store.authenticate(token) == alice.member_id
            assert await store.load_room(rid) == state
            frames = await store.load_frames(rid, 0, 10)
            assert [f.payload for f in frames] == [b"payload-0", b"payload-1", None]
            assert [f.log_index for f in await store.commits_between(rid, 0, 1)] == [0]
            pending = await store.pending_welcomes(alice.member_id)
            assert [w.welcome_id for w in pending] == [welcome]
            assert await store.key_package_count(alice.member_id) == 2
            assert await store.get_group_info(rid) == (1, b"gi")
            with pytest.raises(AppendConflict):
                await store.append(rid, entries(2, 1))
        finally:
            await store.close()


async def test_sqlite_durability_settings(sqlite_url: str) -> None:
    store = await SqlStore.open(sqlite_url)
    try:
        assert (
            await raw(sqlite_url, lambda c: c.exec_driver_sql("PRAGMA journal_mode").scalar())
            == "wal"
        )
        async with store._writer.connect() as conn:
            assert await conn.scalar(sa.text("PRAGMA synchronous")) == 2  # FULL
            assert await conn.scalar(sa.text("PRAGMA foreign_keys")) == 1
    finally:
        await store.close()


async def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        await SqlStore.open("sqlite:///:memory:")


async def test_media_blocks_are_kept_once_and_reached_through_a_room(store: Store) -> None:
    r1, r2 = await new_room(store, 1), await new_room(store, 2)
    block, other = b"\x01" * 300, b"\x02" * 10
    d1, d2 = hashlib.sha256(block).digest(), hashlib.sha256(other).digest()
    assert await store.media_put(r1, d1, block, HIGH) is True
    assert await store.media_put(r1, d1, block, HIGH) is False  # same reference: no change
    assert await store.media_refcount(d1) == 1
    assert await store.media_put(r1, d1, block, MID) is False  # another uploader
    assert await store.media_put(r2, d1, block, HIGH) is False  # another room
    assert await store.media_refcount(d1) == 3
    assert await store.media_get(r1, d1) == block
    assert await store.media_get(r1, d2) is None
    await store.media_put(r2, d2, other, MID)
    assert await store.media_get(r1, d2) is None  # only through a room's reference
    assert await store.media_present(r1, [d2, d1, d1]) == [d1]
    assert await store.media_present(r2, [d2, d1]) == [d2, d1]
    with pytest.raises(NotFound):
        await store.media_put(room_id(9), d1, block, HIGH)
    # Release: one uploader's references, then everyone's; the block goes with the last one.
    assert await store.media_release(r1, [d1, d2], MID) == [d1]
    assert await store.media_refcount(d1) == 2
    assert await store.media_release(r1, [d1], None) == [d1]
    assert await store.media_get(r1, d1) is None
    assert await store.media_get(r2, d1) == block
    assert await store.media_release(r2, [d1, d2], None) == [d1, d2]
    assert (await store.media_refcount(d1), await store.media_refcount(d2)) == (0, 0)
    assert await store.media_release(r2, [d1], None) == []


async def test_media_put_many_answers_each_block_as_one_put_would(store: Store) -> None:
    """Group commit: one transaction, and each block's result is what media_put alone would
    have returned or raised; a refused block is not stored and does not stop the others."""
    r1 = await new_room(store, 1)
    blocks = [bytes([i]) * 1000 for i in range(5)]
    d = [hashlib.sha256(b).digest() for b in blocks]
    await store.media_put(r1, d[0], blocks[0], HIGH)  # 1000 bytes held already
    puts = [
        MediaPut(r1, d[0], blocks[0], HIGH),  # held already: free, not new
        MediaPut(r1, d[1], blocks[1], HIGH),  # 2000 held
        MediaPut(room_id(9), d[2], blocks[2], HIGH),  # no such room
        MediaPut(r1, d[1], blocks[1], HIGH),  # twice in one batch: counted once
        MediaPut(r1, d[3], blocks[3], HIGH),  # 3000 held: the quota
        MediaPut(r1, d[4], blocks[4], HIGH),  # over the quota
        MediaPut(r1, d[4], blocks[4], MID),  # another uploader's quota
    ]
    results = await store.media_put_many(puts, quota=3000)
    assert results[:2] == [False, True]
    assert isinstance(results[2], NotFound)
    assert results[3:5] == [False, True]
    over = results[5]
    assert isinstance(over, OverQuota)
    assert (over.used, over.size, over.quota) == (3000, 1000, 3000)
    assert results[6] is True
    assert await store.media_usage(HIGH) == 3000
    assert await store.media_usage(MID) == 1000
    assert await store.media_refcount(d[1]) == 1
    assert await store.media_refcount(d[2]) == 0  # nothing of the refused block
    assert await store.media_refcount(d[4]) == 1  # MID's reference only
    assert await store.media_present(r1, d) == [d[0], d[1], d[3], d[4]]
    assert await store.media_put_many([]) == []
    # Reads in one go: in the order asked, None where the room holds no such block.
    r2 = await new_room(store, 2)
    assert await store.media_get_many(r1, [d[3], d[2], d[0], d[3]]) == [
        blocks[3],
        None,
        blocks[0],
        blocks[3],
    ]
    assert await store.media_get_many(r2, [d[0]]) == [None]
    assert await store.media_get_many(r1, []) == []
