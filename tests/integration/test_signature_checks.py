"""A frame is checked for its Ed25519 signature once per process: by the server as it arrives.
Clients of the same process (the bridge's bot and its users' devices live in the bridge's
process) find the check done (proto/signing.py) instead of checking it again on the event
loop."""

from __future__ import annotations

import pytest
from helpers.native import make_client, next_message, within
from nacl.signing import VerifyKey

from kalandra_core.proto import Frame
from kalandra_core.server.app import RunningServer


async def test_a_message_is_checked_once_in_a_process_that_serves_and_receives_it(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await make_client(server, "alice")
    bob = await make_client(server, "bob")
    room = await within(alice.create_room(name="once"))
    await within(alice.invite(room, [bob.core.member_id]))
    assert await within(bob.joined.get()) == room

    checks: list[tuple[bytes, bytes]] = []
    real = VerifyKey.verify

    def verify(self: VerifyKey, data: bytes, signature: bytes) -> bytes:
        checks.append((bytes(data), bytes(signature)))
        return real(self, data, signature)

    monkeypatch.setattr(VerifyKey, "verify", verify)
    index = await within(alice.send_text(room, "checked once"))
    got = await next_message(bob, lambda m: m.content.body == "checked once")
    assert got.log_index == index
    stored = Frame.decode((await server.store.load_frames(room, index, 1))[0].encode()).header
    mine = [c for c in checks if c == (stored.signing_data(), stored.signature)]
    assert len(mine) == 1, len(mine)  # the server's; bob's client found it done
    await alice.close()
    await bob.close()
