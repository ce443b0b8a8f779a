"""The bridge against a real Synapse (SQLite): the appservice endpoints refuse a wrong or
missing hs_token (and nothing of such a request is bridged), and after a conversation in both
directions no secret or message text is at rest in the bridge's database or in its log.

One stack for both tests (a Synapse and the bridge take most of this module's time).
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from helpers.native import next_from_others
from matrix.bridge_stack import (
    BridgeStack,
    bridge_stack,
    ghost_of,
    nio_client,
    portal_with_native,
    say,
    wait_history,
)
from nacl.signing import SigningKey
from ruamel.yaml import YAML

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.storage.sql import SqlStore

MARK = secrets.token_hex(6)
TO_NATIVE = f"m2k-secret-{MARK}"
TO_MATRIX = f"k2m-secret-{MARK}"
FORGED = f"forged-{MARK}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("security"), "sqlite") as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def talk(stack: BridgeStack) -> AsyncIterator[dict[str, Any]]:
    """A portal with a native member; one message each way has crossed the bridge."""
    native, token = await native_with_token(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "secrets")
        await say(alice, portal, TO_NATIVE)
        assert (await next_from_others(native)).content.body == TO_NATIVE
        await native.send_text(bytes.fromhex(room_hex), TO_MATRIX)
        seen = await wait_history(alice, portal, ghost_of(native), 1)
        assert [body for _, body in seen] == [TO_MATRIX]
        yield {"native": native, "token": token, "alice": alice, "portal": portal}
    await native.close()


async def native_with_token(stack: BridgeStack) -> tuple[Client, str]:
    """A native member (account made in the bridge's database) and its device token."""
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        member = await store.create_member(f"native_{secrets.token_hex(3)}")
        token = await store.issue_token(member.member_id)
    finally:
        await store.close()
    core = ClientCore(member.member_id, bytes(SigningKey.generate()))
    client = Client(core, ServerAddress("tcp", "127.0.0.1", stack.tcp_port), token)
    await client.connect()
    await client.publish_key_packages(2)
    return client, token


def config_of(stack: BridgeStack) -> dict[str, Any]:
    with open(stack.config, encoding="utf-8") as fh:
        data: dict[str, Any] = YAML(typ="safe").load(fh)
    return data


@pytest.mark.asyncio(loop_scope="module")
async def test_wrong_hs_token_is_refused_and_nothing_is_bridged(
    stack: BridgeStack, talk: dict[str, Any]
) -> None:
    config = config_of(stack)
    hs_token = config["appservice"]["hs_token"]
    as_token = config["appservice"]["as_token"]
    alice, portal, native = talk["alice"], talk["portal"], talk["native"]
    event = {
        "type": "m.room.message",
        "room_id": portal,
        "sender": alice.user_id,
        "event_id": f"$forged{MARK}",
        "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": FORGED},
    }
    base = f"http://127.0.0.1:{stack.as_port}"
    # (Authorization header, query parameters)
    wrong: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),  # no token at all
        ({"Authorization": "Bearer "}, {}),
        ({"Authorization": f"Bearer {hs_token}x"}, {}),
        ({"Authorization": f"Bearer {as_token}"}, {}),  # the other direction's token
        ({}, {"access_token": hs_token[:-1]}),
        # A wrong query token wins over a right header (mautrix reads the query first).
        ({"Authorization": f"Bearer {hs_token}"}, {"access_token": "nope"}),
    ]
    async with aiohttp.ClientSession() as http:
        for i, (headers, params) in enumerate(wrong):
            auth: dict[str, Any] = {"headers": headers, "params": params}
            url = f"{base}/_matrix/app/v1/transactions/txn-{i}-{secrets.token_hex(4)}"
            async with http.put(url, json={"events": [event]}, **auth) as resp:
                body = await resp.json(content_type=None)
                assert resp.status in (401, 403), (i, resp.status, body)
                assert body.get("errcode") in ("M_UNAUTHORIZED", "M_FORBIDDEN"), body
            # The legacy path, the queries and the ping are guarded the same way.
            legacy = f"{base}/transactions/legacy-{i}-{secrets.token_hex(4)}"
            async with http.put(legacy, json={}, **auth) as r:
                assert r.status in (401, 403)
            for query in ("users/@kalandra_1:localhost", "rooms/%23kalandra_00:localhost"):
                async with http.get(f"{base}/_matrix/app/v1/{query}", **auth) as r:
                    assert r.status in (401, 403)
            async with http.post(f"{base}/_matrix/app/v1/ping", json={}, **auth) as r:
                assert r.status in (401, 403)

    # Nothing was bridged: the next message the native member gets is the one Alice sends now.
    await say(alice, portal, f"after-{MARK}")
    assert (await next_from_others(native)).content.body == f"after-{MARK}"
    assert FORGED.encode() not in stack.log.read_bytes()


def database_files(stack: BridgeStack) -> list[Path]:
    db = Path(stack.store_url.removeprefix("sqlite:///"))
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]


def column_values(db: Path) -> list[tuple[str, str, bytes]]:
    """(table, column, value as bytes) of every text or blob value of every table."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out = []
    try:
        tables = [
            name
            for (name,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            cursor = con.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(names, row, strict=True):
                    if isinstance(value, str):
                        out.append((table, column, value.encode()))
                    elif isinstance(value, bytes):
                        out.append((table, column, value))
    finally:
        con.close()
    return out


@pytest.mark.asyncio(loop_scope="module")
async def test_no_secrets_or_message_text_at_rest_or_in_logs(
    stack: BridgeStack, talk: dict[str, Any]
) -> None:
    config = config_of(stack)
    state_key = str(config["bridge"]["mls_state_key"])
    raw_state_key = base64.b64decode(state_key)
    forbidden = {
        "message to native": TO_NATIVE.encode(),
        "message to Matrix": TO_MATRIX.encode(),
        "forged message": FORGED.encode(),
        "native device token": talk["token"].encode(),
        "as_token": str(config["appservice"]["as_token"]).encode(),
        "hs_token": str(config["appservice"]["hs_token"]).encode(),
        "mls_state_key": state_key.encode(),
        "mls_state_key (raw)": raw_state_key,
        "mls_state_key (hex)": raw_state_key.hex().encode(),
    }
    # The needles are right: the tokens and the key are in the config file, by design.
    config_bytes = stack.config.read_bytes()
    for what in ("as_token", "hs_token", "mls_state_key"):
        assert forbidden[what] in config_bytes, what
    # The bridge writes its log and checkpoints its database as it stops: scan after that
    # (this is the module's last test; the stack is torn down next).
    await stack.stop_bridge()
    found = []
    for path in [stack.log, *database_files(stack)]:
        data = path.read_bytes()
        found += [(path.name, what) for what, needle in forbidden.items() if needle in data]
    for table, column, value in column_values(database_files(stack)[0]):
        found += [
            (f"{table}.{column}", what) for what, needle in forbidden.items() if needle in value
        ]
    assert not found, found
