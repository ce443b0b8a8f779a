"""The `device-token` command's table code against a real homeserver database (SQLite): the
token ids it lists are those of the tokens the store issued, and revoking one by id revokes
exactly that token, as the server's authentication sees it."""

from __future__ import annotations

from pathlib import Path

from mautrix.util.async_db import Database

from bridge.commands.util import parse_room_id
from bridge.db.device_token import DeviceTokenTable, token_hash, token_id
from kalandra_core.storage.sql import SqlStore


async def test_list_and_revoke_one_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'home.db'}"
    store = await SqlStore.open(url)  # creates the homeserver's schema
    db = Database.create(url)
    await db.start()
    try:
        member = await store.create_member("mx_bob_localhost")
        other = await store.create_member("native")
        first = await store.issue_token(member.member_id)
        second = await store.issue_token(member.member_id)
        foreign = await store.issue_token(other.member_id)
        table = DeviceTokenTable(db)

        active = await table.active(member.member_id)
        assert sorted(t.token_id for t in active) == sorted([token_id(first), token_id(second)])

        # Another member's token is not this member's to revoke.
        assert not await table.revoke(member.member_id, token_hash(foreign))
        assert await store.authenticate(foreign) == other.member_id

        assert await table.revoke(member.member_id, token_hash(first))
        assert not await table.revoke(member.member_id, token_hash(first))  # once
        assert await store.authenticate(first) is None
        assert await store.authenticate(second) == member.member_id
        assert [t.token_id for t in await table.active(member.member_id)] == [token_id(second)]
    finally:
        await db.stop()
        await store.close()


def test_room_ids_are_16_bytes_of_hex() -> None:
    assert parse_room_id("00" * 16) == bytes(16)
    assert parse_room_id("0x" + "ab" * 16) == b"\xab" * 16
    assert parse_room_id("ab" * 15) is None
    assert parse_room_id("zz" * 16) is None
