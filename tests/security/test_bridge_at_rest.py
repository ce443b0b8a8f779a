"""The bridge with encryption required and its bot cross-signed, run (``python -m bridge -g``,
then the bridge) with umask 022, against a real Synapse, SQLite and PostgreSQL:

- an unencrypted message in an (encrypted) portal is refused visibly (status event, notice) and
  nothing of it reaches Kalandra (``bridge.encryption.require``);
- the files holding secrets are 0600: the config, the registration (one was there already,
  0644), the SQLite database and its -wal/-shm, the bot's recovery key;
- a symlink placed where the recovery key goes is not followed: its target is untouched, the
  bridge says why and does not cross-sign; once it is moved away, a restart does.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from matrix.bridge_stack import (
    BOT,
    DATABASES,
    BridgeStack,
    bridge_stack,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    say,
)
from nio import AsyncClient

from bridge.encryption.e2ee import RECOVERY_KEY_FILE
from kalandra_core.client.events import Message

WITHIN = 60.0
DECOY = "the symlink's target, which the bridge must not touch\n"
CLEAR = f"sent in clear {secrets.token_hex(4)}"
STATUS = "com.beeper.message_send_status"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    work = tmp_path_factory.mktemp("at-rest")
    (work / "decoy.txt").write_text(DECOY)
    (work / RECOVERY_KEY_FILE).symlink_to(work / "decoy.txt")
    (work / "registration.yaml").write_text("an older registration\n")
    os.chmod(work / "registration.yaml", 0o644)
    umask = os.umask(0o022)  # inherited by `python -m bridge -g` and the bridge
    try:
        async with bridge_stack(
            work,
            request.param,
            bridge_options={
                "encryption.allow": True,
                "encryption.require": True,
                "encryption.self_sign": True,
            },
        ) as stack:
            yield stack
    finally:
        os.umask(umask)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def send_in_clear(
    alice: AsyncClient, portal: str, kind: str, content: dict[str, Any]
) -> str:
    """The same user's event in clear (as a client without encryption would send it)."""
    response = await alice.send(
        "PUT",
        f"/_matrix/client/v3/rooms/{portal}/send/{kind}/{secrets.token_hex(8)}",
        json.dumps(content),
        headers={"Authorization": f"Bearer {alice.access_token}"},
    )
    assert response.status == 200, await response.text()
    return str((await response.json())["event_id"])


async def refusal_of(alice: AsyncClient, portal: str, event_id: str) -> tuple[str, str]:
    """(status, the bot's notice) once the bot has reported ``event_id`` as not bridged."""
    async with asyncio.timeout(WITHIN):
        while True:
            history = await room_history(alice, portal)
            statuses = [
                e.source["content"]
                for e in history
                if e.sender == BOT
                and e.source.get("type") == STATUS
                and e.source["content"].get("m.relates_to", {}).get("event_id") == event_id
                and e.source["content"].get("status") != "PENDING"  # (a slow queue)
            ]
            notices = [
                str(e.source["content"].get("body"))
                for e in history
                if e.sender == BOT
                and e.source.get("type") == "m.room.message"
                and str(e.source["content"].get("body")).startswith("Not bridged")
            ]
            if statuses and notices:
                return statuses[0]["status"], notices[-1]
            await asyncio.sleep(0.5)


@pytest.mark.asyncio(loop_scope="module")
async def test_unencrypted_message_in_a_portal_is_refused_when_encryption_is_required(
    stack: BridgeStack,
) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "required")
        assert alice.rooms[portal].encrypted  # require: new portals are encrypted
        room = bytes.fromhex(room_hex)
        clear = await send_in_clear(
            alice, portal, "m.room.message", {"msgtype": "m.text", "body": CLEAR}
        )
        status, notice = await refusal_of(alice, portal, clear)
        assert status == "FAIL_PERMANENT"
        assert "requires encryption" in notice, notice
        # Nothing of it reached Kalandra: the native member's next message is the encrypted
        # one sent after it.
        encrypted = await say(alice, portal, "encrypted")
        got: list[Message] = []
        await asyncio.wait_for(messages_from_others(native, got, 1, room), WITHIN)
        assert [m.content.body for m in got] == ["encrypted"]
        # A reaction in clear is refused the same way.
        annotation = {"rel_type": "m.annotation", "event_id": encrypted, "key": "👍"}
        reaction = await send_in_clear(alice, portal, "m.reaction", {"m.relates_to": annotation})
        status, _ = await refusal_of(alice, portal, reaction)
        assert status == "FAIL_PERMANENT"
    await native.close()
    assert CLEAR not in stack.log.read_text(errors="replace")


@pytest.mark.asyncio(loop_scope="module")
async def test_secrets_are_private_files_and_the_recovery_key_never_follows_a_symlink(
    stack: BridgeStack,
) -> None:
    work = stack.work
    private = [work / "config.yaml", work / "registration.yaml"]
    if stack.database_url.startswith("sqlite:"):
        database = work / "kalandra.db"
        private += [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    for path in private:
        assert mode(path) == 0o600, (path.name, oct(mode(path)))
    assert "as_token" in (work / "registration.yaml").read_text()  # replaced, not kept

    # The first start found a symlink where the recovery key goes: not followed, not
    # replaced, and the bridge said why (and did not cross-sign without a place for the key).
    link = work / RECOVERY_KEY_FILE
    assert link.is_symlink()
    assert (work / "decoy.txt").read_text() == DECOY
    assert "is not cross-signed" in stack.log.read_text(errors="replace")

    # Moved away, the next start cross-signs: the key in a new 0600 file.
    link.unlink()
    await stack.stop_bridge()
    await stack.restart()
    async with asyncio.timeout(WITHIN):
        while not link.exists():  # noqa: ASYNC110 - written just after the bridge is ready
            await asyncio.sleep(0.5)
    assert not link.is_symlink()
    assert mode(link) == 0o600
    async with asyncio.timeout(WITHIN):
        while not link.read_text().strip():  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    assert link.read_text().strip() not in stack.log.read_text(errors="replace")
    assert (work / "decoy.txt").read_text() == DECOY
