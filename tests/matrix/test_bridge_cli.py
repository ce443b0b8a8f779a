"""The `kalandra` CLI as a person uses it, through the bridge, against a real Synapse.

One stack for the module (SQLite): a native member logged in with the CLI (a real subprocess
for every command) in a portal with Alice, a Matrix user. Matrix to CLI: what `history` and
`tail` print for Alice's display name and MXID, formatted text, a reply, an edit, a reaction, a
redaction and room name and topic changes. CLI to Matrix: `send --markdown`, `reply`, `edit`,
`react` and `unreact` as Alice's client sees them (HTML body, m.in_reply_to, m.replace,
m.annotation, the reaction redacted). A relayed message: from the bridge's bot, by its name.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from nio import AsyncClient, RoomSendResponse

from kalandra_core.storage.sql import SqlStore
from matrix.bridge_stack import (
    BOT,
    BridgeStack,
    bridge_stack,
    command,
    create_portal,
    ghost_history,
    nio_client,
    room_history,
    say,
    sync_until,
)

WITHIN = 60.0
INDEX = re.compile(r"at log index (\d+)")


@dataclass
class Portal:
    stack: BridgeStack
    alice: AsyncClient
    state: Path
    room: str  # hex
    portal: str  # Matrix room id
    ghost: str

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "kalandra_core", args[0], "--state", str(self.state)),
            *args[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), WITHIN)
        assert proc.returncode == 0, (args, out, err)
        return out.decode()

    async def sent(self, *args: str) -> int:
        """Run a sending command; the log index it reports."""
        match = INDEX.search(await self.cli(*args))
        assert match, args
        return int(match.group(1))

    async def history_until(self, done: Callable[[str], bool]) -> str:
        async with asyncio.timeout(WITHIN):
            while not done(shown := await self.cli("history", self.room, "--limit", "100")):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        return shown


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def room(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Portal]:
    work = tmp_path_factory.mktemp("cli")
    relay = {"relay.enabled": True}
    async with bridge_stack(work, "sqlite", others=("relay",), bridge_options=relay) as stack:
        store = await SqlStore.open(stack.store_url, migrate=False)
        try:
            account = await store.create_member(f"native_{secrets.token_hex(3)}")
            token = await store.issue_token(account.member_id)
        finally:
            await store.close()
        async with nio_client(stack.synapse, stack.user) as alice:
            room_hex, portal = await create_portal(alice, "cli")
            ghost = f"@kalandra_{account.member_id}:localhost"
            it = Portal(stack, alice, work / "native.db", room_hex, portal, ghost)
            await it.cli(
                "login", "--server", f"tcp://127.0.0.1:{stack.tcp_port}", "--token", token
            )
            answer = await command(
                alice, portal, f"!kalandra invite {room_hex} {account.member_id}"
            )
            assert answer.startswith("Added member"), answer
            assert room_hex in await it.cli("join", "--wait", "2")
            # The ghost is in the portal before anyone speaks (history visibility `invited`).
            async with asyncio.timeout(WITHIN):
                while True:
                    state = await alice.room_get_state_event(portal, "m.room.member", it.ghost)
                    if getattr(state, "content", {}).get("membership") == "join":
                        break
                    await asyncio.sleep(0.2)
            yield it


async def send(alice: AsyncClient, room: str, content: dict[str, Any], kind: str) -> str:
    sent = await alice.room_send(room, kind, content)
    assert isinstance(sent, RoomSendResponse), sent
    return str(sent.event_id)


async def ghost_event(it: Portal, kind: str, match: Callable[[dict[str, Any]], bool]) -> Any:
    """The ghost's first event of ``kind`` in the portal that ``match`` accepts (waits)."""
    async with asyncio.timeout(WITHIN):
        while True:
            for event in await room_history(it.alice, it.portal):
                source = event.source
                mine = source.get("sender") == it.ghost and source.get("type") == kind
                if mine and match(source):
                    return source
            await asyncio.sleep(0.5)


class Follower:
    """`kalandra tail` running: the lines it printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._task = asyncio.create_task(self._read(proc.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def until(self, match: Callable[[str], bool]) -> str:
        async with asyncio.timeout(WITHIN):
            while not (found := [line for line in self.lines if match(line)]):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        return found[0]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(2)  # Ctrl-C
        code = await asyncio.wait_for(self.proc.wait(), WITHIN)
        self._task.cancel()
        return code


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_side_as_history_and_tail_show_it(room: Portal) -> None:
    alice = room.alice
    me = f"Alice Liddell ({alice.user_id})"
    await alice.set_displayname("Alice Liddell")
    await room.cli("set-displayname", "Nat", "Native")
    question = await room.sent("send", room.room, "question?")
    ((question_event, _),) = await _ghost_texts(room, 1)
    tail = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "kalandra_core", "tail", room.room, "--state", str(room.state)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    follower = Follower(tail)
    try:
        await follower.until(lambda line: line.endswith("<Nat Native> question?"))
        formatted = {
            "msgtype": "m.text",
            "body": "bold link x = 1",
            "format": "org.matrix.custom.html",
            "formatted_body": '<strong>bold</strong> <a href="https://example.org/">link</a>'
            " <code>x = 1</code>",
        }
        await send(alice, room.portal, formatted, "m.room.message")
        reply = {
            "msgtype": "m.text",
            "body": "answer",
            "m.relates_to": {"m.in_reply_to": {"event_id": question_event}},
        }
        await send(alice, room.portal, reply, "m.room.message")
        typo = await say(alice, room.portal, "typo")
        edit = {
            "msgtype": "m.text",
            "body": "* fixed",
            "m.new_content": {"msgtype": "m.text", "body": "fixed"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": typo},
        }
        await send(alice, room.portal, edit, "m.room.message")
        reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": question_event}}
        reaction["m.relates_to"]["key"] = "👍"
        await send(alice, room.portal, reaction, "m.reaction")
        secret = await say(alice, room.portal, "secret")
        await alice.room_redact(room.portal, secret)
        await alice.room_put_state(room.portal, "m.room.name", {"name": "CLI room"})
        await alice.room_put_state(room.portal, "m.room.topic", {"topic": "a topic"})

        # tail: each as it comes.
        await follower.until(
            lambda line: line.endswith(f"<{me}> **bold** link <https://example.org/> `x = 1`")
        )
        await follower.until(lambda line: line.endswith(f"<{me}> answer"))
        await follower.until(lambda line: line.endswith(f"<{me}> fixed (edited)"))
        await follower.until(lambda line: f"<{me}> reacted 👍 to #{question}" in line)
        await follower.until(
            lambda line: line.endswith("(message removed)") or " removed #" in line
        )
        await follower.until(lambda line: line.endswith(f"<{me}> changed the topic to 'a topic'"))
        assert any(f"<{me}> renamed the room to 'CLI room'" in line for line in follower.lines)
    finally:
        assert await follower.stop() == 0

    # history: the settled view.
    shown = await room.history_until(lambda text: "changed the topic" in text)
    lines = shown.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("<Nat Native> question?"))
    assert lines[at + 1] == f"    [👍 {me}]"
    answer = next(i for i, line in enumerate(lines) if line.endswith(f"<{me}> answer"))
    assert lines[answer - 1] == f"  > #{question} <Nat Native> question?"
    assert any(line.endswith(f"<{me}> fixed (edited)") for line in lines)
    assert any(line.endswith(f"<{me}> (message removed)") for line in lines)
    assert not any("typo" in line or "secret" in line for line in lines)
    assert any(line.endswith(f"<{me}> renamed the room to 'CLI room'") for line in lines)
    assert any(
        line.endswith(f"<{me}> **bold** link <https://example.org/> `x = 1`") for line in lines
    )
    # With colours: bold and a link as terminal styles, never the message's own escapes.
    colour = await room.cli("history", room.room, "--color", "always")
    assert "\x1b[1mbold\x1b[22m" in colour
    # The member list names them too.
    members = await room.cli("members", room.room)
    assert me in members
    assert "Nat Native" in members


async def _ghost_texts(room: Portal, count: int) -> list[tuple[str, str]]:
    async with asyncio.timeout(WITHIN):
        while len(found := await ghost_history(room.alice, room.portal, room.ghost)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return found


@pytest.mark.asyncio(loop_scope="module")
async def test_send_markdown(room: Portal) -> None:
    text = "**strong** and [a link](https://example.org) `code`"
    await room.sent("send", room.room, "--markdown", text)
    formatted = await ghost_event(
        room, "m.room.message", lambda e: "<strong>" in e["content"].get("formatted_body", "")
    )
    content = formatted["content"]
    assert content["format"] == "org.matrix.custom.html"
    assert content["formatted_body"] == (
        '<p><strong>strong</strong> and <a href="https://example.org">a link</a>'
        " <code>code</code></p>"
    )
    # The bridge gives Matrix the HTML's text as the plain body.
    assert content["body"] == "strong and a link (https://example.org) code"
    shown = await room.cli("history", room.room)
    assert "<Nat Native> **strong** and a link <https://example.org> `code`" in shown


@pytest.mark.asyncio(loop_scope="module")
async def test_cli_sends_what_matrix_shows(room: Portal) -> None:
    alice = room.alice
    hello = await say(alice, room.portal, "hello native")
    shown = await room.history_until(lambda text: "hello native" in text)
    (target,) = [
        int(m.group(1)) for m in re.finditer(r"^#(\d+) .* hello native$", shown, re.MULTILINE)
    ]

    draft = await room.sent("send", room.room, "first draft")
    original = await ghost_event(
        room, "m.room.message", lambda e: e["content"].get("body") == "first draft"
    )

    await room.sent("reply", room.room, str(target), "a reply")
    replied = await ghost_event(
        room, "m.room.message", lambda e: e["content"].get("body") == "a reply"
    )
    assert replied["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": hello}}

    await room.sent("edit", room.room, str(draft), "edited", "text")
    edited = await ghost_event(room, "m.room.message", lambda e: "m.new_content" in e["content"])
    assert edited["content"]["m.relates_to"] == {
        "rel_type": "m.replace",
        "event_id": original["event_id"],
    }
    assert edited["content"]["m.new_content"]["body"] == "edited text"

    await room.sent("react", room.room, str(target), "🎉")
    annotation = {"rel_type": "m.annotation", "event_id": hello, "key": "🎉"}
    reacted = await ghost_event(
        room, "m.reaction", lambda e: e["content"].get("m.relates_to") == annotation
    )
    await room.sent("unreact", room.room, str(target), "🎉")
    await ghost_event(
        room,
        "m.reaction",
        lambda e: (
            e["event_id"] == reacted["event_id"] and "redacted_because" in e.get("unsigned", {})
        ),
    )
    # The CLI's own view agrees: the edit applied, the reaction gone, the reply quoted.
    shown = await room.cli("history", room.room, "--limit", "100")
    assert f"> #{target} <Alice Liddell ({alice.user_id})> hello native" in shown
    assert "first draft" not in shown
    assert "<Nat Native> edited text (edited)" in shown
    assert "🎉" not in shown.split("hello native", 1)[1].split("\n#", 1)[0]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_relayed_message_is_the_bots_by_its_name(room: Portal) -> None:
    async with nio_client(room.stack.synapse, room.stack.others["relay"]) as bob:
        await bob.set_displayname("Bob Relay")
        await room.alice.room_invite(room.portal, bob.user_id)
        await bob.join(room.portal)
        await sync_until(bob, lambda: room.portal in bob.rooms, "the join")
        answer = await command(room.alice, room.portal, "!kalandra set-relay")
        assert answer.startswith("Relay mode is on"), answer
        await say(bob, room.portal, "relayed hello")
        shown = await room.history_until(lambda text: "relayed hello" in text)
        assert f"<Kalandra bridge bot ({BOT})> Bob Relay: relayed hello" in shown


@pytest.mark.asyncio(loop_scope="module")
async def test_the_ghosts_display_name_follows_set_displayname(room: Portal) -> None:
    alice = room.alice

    async def shown_name() -> str:
        state = await alice.room_get_state_event(room.portal, "m.room.member", room.ghost)
        return str(getattr(state, "content", {}).get("displayname"))

    async def sent_and_bridged(text: str) -> None:
        await room.sent("send", room.room, text)
        await ghost_event(room, "m.room.message", lambda e: e["content"].get("body") == text)

    await room.cli("set-displayname", "Nat", "Native")
    await sent_and_bridged("as Nat")
    assert await shown_name() == "Nat Native (Kalandra)"  # bridge.displayname_template

    await room.cli("set-displayname", "Natalie  N.\x07")  # control characters dropped
    await sent_and_bridged("as Natalie")
    assert await shown_name() == "Natalie N. (Kalandra)"
    # Renamed in the portal before that message, after the one before: each message shows
    # under the name it was sent with.
    events = [event.source for event in await room_history(alice, room.portal)]
    ghost_events = [e for e in events if e.get("sender") == room.ghost]
    order = [e["content"].get("body") or e["content"].get("displayname") for e in ghost_events]
    at = order.index("as Natalie")
    assert order[at - 2 : at] == ["as Nat", "Natalie N. (Kalandra)"], order

    # No name any more: the messages carry none, and the ghost keeps the last one (as the
    # native timeline does).
    await room.cli("set-displayname")
    await sent_and_bridged("with no name")
    assert await shown_name() == "Natalie N. (Kalandra)"
    shown = await room.cli("history", room.room, "--limit", "100")
    assert "<Natalie N.> as Natalie" in shown
