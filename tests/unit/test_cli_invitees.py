"""`kalandra invite ROOM ...`: which names are members to add and which are Matrix users to let in
through the bridge. ``bridge`` and the bridge bot's own Matrix id are the bridge's member, as the
server names it in HelloReply; a server without a bridge names none."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from kalandra_core.client.cli import UsageError, _invitees
from kalandra_core.client.core import ClientCore
from kalandra_core.proto import HelloReply


def core(bridge: tuple[int, str] | None) -> ClientCore:
    c = ClientCore(7, bytes(SigningKey.generate()))
    c.hello_reply(
        HelloReply(
            session_id=1,
            member_id=7,
            bridge_member_id=bridge[0] if bridge else None,
            bridge_mxid=bridge[1] if bridge else None,
        )
    )
    return c


def test_bridge_and_the_bots_mxid_are_the_bridges_member() -> None:
    c = core((99, "@kalandrabot:example.org"))
    assert _invitees(c, ["bridge", "12", "@bob:example.org"]) == ([99, 12], ["@bob:example.org"])
    assert _invitees(c, ["@kalandrabot:example.org"]) == ([99], [])
    assert _invitees(c, ["@kalandrabot:other.org"]) == ([], ["@kalandrabot:other.org"])


def test_a_server_without_a_bridge_names_none() -> None:
    c = core(None)
    with pytest.raises(UsageError, match="runs no Matrix bridge"):
        _invitees(c, ["bridge"])
    assert _invitees(c, ["@kalandrabot:example.org"]) == ([], ["@kalandrabot:example.org"])
    with pytest.raises(UsageError, match="not a member id"):
        _invitees(c, ["brigde"])
