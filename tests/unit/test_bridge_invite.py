"""A native member's bridge invitation (kalandra_core/client/bridge_invite.py): what it carries,
and that only a well-formed Matrix user id is read out of a message."""

from __future__ import annotations

import pytest

from kalandra_core.client.bridge_invite import (
    FIELD,
    InvalidBridgeInvite,
    invite_content,
    invited_mxid,
)
from kalandra_core.client.content import Content


def test_an_invitation_survives_the_wire_and_reads_as_a_notice() -> None:
    content = Content.decode(invite_content("@bob:example.org").encode())
    assert invited_mxid(content) == "@bob:example.org"
    assert content.kind == "notice"
    assert "@bob:example.org" in content.body


@pytest.mark.parametrize("bad", ["bob", "@bob", "@:x", "@bob:", "@b ob:x", "@" + "a" * 300 + ":x"])
def test_malformed_user_ids_are_refused_and_never_read(bad: str) -> None:
    with pytest.raises(InvalidBridgeInvite):
        invite_content(bad)
    assert invited_mxid(Content(body="x", extra={FIELD: bad})) is None
    assert invited_mxid(Content(body="x", extra={FIELD: 5})) is None
    assert invited_mxid(Content(body="x")) is None
