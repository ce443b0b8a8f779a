"""Headers that announce more than the server will take are refused before their payload is
read: before Hello only small session frames (Hello, Ping, Pong, Goodbye, 8 KiB at most) are
accepted, any other header is answered with an Error frame and the connection closed; after
Hello a payload over ``max_payload_size`` is skipped unread (QUOTA_EXCEEDED) and the session
goes on. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

from acceptance.acceptance_harness import running_server

from kalandra_core.proto import MAX_PAYLOAD_SIZE, ErrorCode, Opcode
from kalandra_core.server.app import RunningServer
from kalandra_core.server.session import PRE_HELLO_MAX_PAYLOAD
from security.conftest import MAX_PAYLOAD
from security.hostile import (
    Raw,
    account,
    dummy_envelope,
    error_of,
    header_bytes,
    peak_rss,
    raw,
    rows,
    still_serving,
)

ATTACKERS = 20
MIB = 1024 * 1024
CHUNK = bytes(256 * 1024)


async def refused_then_closed(conn: Raw, request_id: int) -> tuple[int, str]:
    """The Error frame that answers ``request_id``, then the server's close."""
    frame = await conn.next()
    assert frame.header.opcode == Opcode.ERROR, frame.header
    assert frame.header.request_id == request_id
    await conn.wait_closed()
    error = error_of(frame)
    return error.code, error.message


async def test_unauthenticated_connections_cannot_make_the_server_buffer_payloads(
    tmp_path: Path, db_url: str
) -> None:
    """20 connections announce a 16 MiB Hello and stream it: each is answered on the header
    alone (QUOTA_EXCEEDED naming the limit) and closed, and the server process never holds the
    payloads (its peak resident memory stays far below 20 x 16 MiB)."""
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server", db_url) as proc:
        assert proc.proc is not None
        server_port = proc.tcp_port
        peak_before = peak_rss(proc.proc.pid)

        async def attack(i: int) -> tuple[int, str]:
            conn = await raw(server_port)
            conn.write(header_bytes(Opcode.HELLO, MAX_PAYLOAD_SIZE, request_id=100 + i))
            # The answer comes on the header alone (today's server would wait for 16 MiB).
            frame = await conn.next()
            # Then the payload goes anyway, until the server's close stops it. (Written only
            # after the answer is in: a socket closed with unread input sends a reset, and a
            # reset can drop what the peer had not read yet.)
            await conn.stream(MAX_PAYLOAD_SIZE, CHUNK)
            await conn.wait_closed()
            assert frame.header.opcode == Opcode.ERROR, frame.header
            assert frame.header.request_id == 100 + i
            error = error_of(frame)
            return error.code, error.message

        answers = await asyncio.gather(*(attack(i) for i in range(ATTACKERS)))
        for code, message in answers:
            assert code == ErrorCode.QUOTA_EXCEEDED, (code, message)
            assert str(PRE_HELLO_MAX_PAYLOAD) in message
        grown = peak_rss(proc.proc.pid) - peak_before
        assert grown < 48 * MIB, f"the server grew by {grown // MIB} MiB"

        # Room frames before Hello, however small: refused on the header, closed.
        conn = await raw(server_port)
        frame = conn.frame(Opcode.APP_MESSAGE, dummy_envelope(0), sender=1, room=1)
        conn.write(frame.encode())
        code, _ = await refused_then_closed(conn, frame.header.request_id)
        assert code == ErrorCode.NOT_AUTHORIZED


async def test_an_oversized_frame_is_refused_before_buffering(
    db_server: RunningServer, db_url: str
) -> None:
    """In-process server (limit 64 KiB): the refusal comes on the header alone, whoever sends
    it; an authenticated session skips the payload unread and stays usable."""
    server = db_server
    alice = await account(server, "alice")
    member = await raw(server, hello_as=alice)  # binds her device key
    before = await rows(db_url)

    # Before Hello: a Hello one byte over the bound, and a room frame, each on its own socket.
    for opcode, size, expected in (
        (Opcode.HELLO, PRE_HELLO_MAX_PAYLOAD + 1, ErrorCode.QUOTA_EXCEEDED),
        (Opcode.COMMIT, 200, ErrorCode.NOT_AUTHORIZED),
    ):
        conn = await raw(server)
        conn.write(header_bytes(opcode, size, request_id=5))  # the header only: no payload
        code, _ = await refused_then_closed(conn, 5)
        assert code == expected, (opcode.name, code)

    # After Hello: announced over max_payload_size, answered before any payload byte is sent.
    conn = member
    big = conn.frame(Opcode.APP_MESSAGE, b"", account=alice, room=1)
    big.header.payload_size = 4 * MIB
    conn.write(big.header.to_bytes())
    error = await conn.error(big.header.request_id)
    assert error.code == ErrorCode.QUOTA_EXCEEDED
    assert str(MAX_PAYLOAD) in error.message
    # The payload is skipped, not buffered, and framing holds: the next frame is answered.
    assert await conn.stream(4 * MIB, CHUNK) == 4 * MIB
    rid = conn.send(Opcode.PING)
    assert (await conn.reply(rid)).header.opcode == Opcode.PONG
    assert not conn.closed.is_set()
    conn.close()

    await still_serving(server)
    assert await rows(db_url) == before
