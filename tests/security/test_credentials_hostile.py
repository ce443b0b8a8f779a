"""Credentials at Hello, attacked over raw TCP frames and used by the real client library and
CLI: a device token alone opens no session (the Hello must prove the device's key, fresh and
once), and a login code is redeemed once for a device token bound to the key that proved it.
On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.proto import ErrorCode, Hello, HelloReply, Opcode, decode_payload, hlc
from kalandra_core.server.app import RunningServer
from kalandra_core.storage.base import login_code_hash
from security.hostile import (
    Raw,
    account,
    client,
    db_rows,
    expect_error,
    now_hlc,
    raw,
)

SKEW_MS = 5 * 60 * 1000  # the server's default max_clock_skew_ms


async def refused(server: RunningServer, token: str, key: SigningKey, **kw: object) -> None:
    """This Hello is answered NotAuthorized and the connection is closed."""
    conn = await raw(server)
    frame = conn.hello_frame(token, key, **kw)  # type: ignore[arg-type]
    conn.write(frame.encode())
    await expect_error(conn, frame.header.request_id, ErrorCode.NOT_AUTHORIZED)
    await conn.wait_closed()


async def hello_reply(conn: Raw, data: bytes) -> HelloReply:
    conn.write(data)
    frame = await conn.next()
    assert frame.header.opcode == Opcode.HELLO_REPLY, decode_payload(
        frame.header.opcode, frame.payload
    )
    reply = decode_payload(Opcode.HELLO_REPLY, frame.payload)
    assert isinstance(reply, HelloReply)
    return reply


async def native(server: RunningServer, key: SigningKey, credential: str) -> Client:
    assert server.tcp_port is not None
    c = Client(
        ClientCore(0, bytes(key)),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        credential,
        reconnect=False,
    )
    await c.connect()
    return c


async def test_a_device_token_alone_or_a_replayed_hello_opens_no_session(
    server_on_each_db: RunningServer,
) -> None:
    server = server_on_each_db
    url = server.hub.config.database
    alice = await account(server, "alice")
    bound = await client(server, alice)  # the real client binds alice's key
    await bound.close()
    bob = await account(server, "bob")  # no key bound yet
    thief = SigningKey.generate()
    stolen = Raw().hello_frame(alice.token, alice.key)  # a Hello captured on the wire
    assert stolen.header.hlc_timestamp

    before = await db_rows(url)
    # The token with alice's public key but no proof, or a proof made by another key.
    conn = await raw(server)
    unproved = Hello(auth_token=alice.token.encode(), signature_key=bytes(alice.key.verify_key))
    rid = conn.send(Opcode.HELLO, unproved, hlc=now_hlc(), sign=False)
    await expect_error(conn, rid, ErrorCode.NOT_AUTHORIZED)
    await conn.wait_closed()
    forged = thief.sign(b"anything").signature
    await refused(server, alice.token, alice.key, proof=forged)
    # The thief's own key, properly proved: not the key alice bound.
    await refused(server, alice.token, thief)
    # Alice's own proof, but stale or from the future (beyond the allowed clock skew).
    now_ms = int(time.time() * 1000)
    await refused(server, alice.token, alice.key, hlc=hlc.pack(now_ms - SKEW_MS - 60_000, 0))
    await refused(server, alice.token, alice.key, hlc=hlc.pack(now_ms + SKEW_MS + 60_000, 0))
    await refused(server, alice.token, alice.key, hlc=0)
    # A member with no key yet: a Hello without proof binds nothing.
    await refused(server, bob.token, bob.key, proof=bytes(64))
    member = await server.store.get_member(bob.member_id)
    assert member is not None
    assert member.signature_key is None
    assert await db_rows(url) == before

    # The captured Hello works once (it was alice's), and never again on a new connection.
    first = await raw(server)
    assert (await hello_reply(first, stolen.encode())).member_id == alice.member_id
    again = await raw(server)
    again.write(stolen.encode())
    await expect_error(again, stolen.header.request_id, ErrorCode.NOT_AUTHORIZED)
    await again.wait_closed()
    # The real clients still log in, again and again (each Hello is fresh).
    for _ in range(2):
        c = await client(server, alice)
        assert c.core.member_id == alice.member_id
        await c.close()
    c = await client(server, bob)
    await c.close()
    member = await server.store.get_member(bob.member_id)
    assert member is not None
    assert member.signature_key == bytes(bob.key.verify_key)


async def test_a_login_code_opens_one_session_and_nothing_else(
    server_on_each_db: RunningServer, tmp_path: Path
) -> None:
    server = server_on_each_db
    url = server.hub.config.database
    store = server.store
    bridged = await account(server, "mx_bridged")  # its key is held by someone else (a bridge)
    await (await client(server, bridged)).close()
    carol = (await store.create_member("carol")).member_id
    now_ms = int(time.time() * 1000)
    expired = await store.issue_login_code(carol, ttl_seconds=60, now_ms=now_ms - 61_000)
    mine = SigningKey.generate()
    for_bridged = await store.issue_login_code(bridged.member_id)
    unproved = await store.issue_login_code(carol)

    before = await db_rows(url)
    await refused(server, "klc_" + "a" * 21, mine)  # unknown
    await refused(server, expired, mine)
    # A code, but no proof of the key it would bind.
    await refused(server, unproved, mine, proof=bytes(64))
    # A code for a member whose key is bound: a new native key stays refused.
    await refused(server, for_bridged, mine)
    after = await db_rows(url)
    # Nothing bound, no device token issued; the codes redeemed are gone (single use), the
    # one offered without proof was not even looked up.
    assert after["device_tokens"] == before["device_tokens"]
    assert after["members"] == before["members"]
    assert [bytes(r[0]) for r in after["login_codes"]] == [login_code_hash(unproved)]
    assert await store.redeem_login_code(for_bridged, now_ms) is None

    # The real client redeems a code: a device token comes back, and the key is bound.
    code = await store.issue_login_code(carol)
    c = await native(server, mine, code)
    assert c.core.member_id == carol
    token = c.token
    assert token != code
    assert not token.startswith("klc_")
    await c.close()
    member = await store.get_member(carol)
    assert member is not None
    assert member.signature_key == bytes(mine.verify_key)
    # The same code again (even with the same key) is refused; the token keeps working.
    await refused(server, code, mine)
    c = await native(server, mine, token)
    assert c.core.member_id == carol
    await c.close()
    assert len((await db_rows(url))["device_tokens"]) == len(before["device_tokens"]) + 1

    # The CLI: an operator issues a code, the user logs in with it, later commands use the
    # device token it was exchanged for.
    dave = (await store.create_member("dave")).member_id
    dave_code = (await cli("admin", "issue-code", "dave", "--database", url)).split()[1]
    assert dave_code.startswith("klc_")
    state = str(tmp_path / "dave.db")
    server_url = f"tcp://127.0.0.1:{server.tcp_port}"
    out = await cli("login", "--state", state, "--server", server_url, "--code", dave_code)
    assert f"member {dave}" in out
    await cli("rooms", "--state", state)  # a new connection: with the device token
    await cli("login", "--state", state, "--server", server_url, "--code", dave_code, ok=False)


async def cli(*args: str, ok: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kalandra_core",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert (proc.returncode == 0) == ok, (args, out, err)
    return out.decode()
