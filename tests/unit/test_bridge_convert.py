"""Matrix message content -> Kalandra content, and bridged users' account names."""

from __future__ import annotations

from mautrix.types import Format, MessageType, TextMessageEventContent

from bridge.members.bridged_users import member_name, mxid_of_member_name
from bridge.portal import kalandra_content, matrix_content
from kalandra_core.client.content import Content


def test_text_notice_emote_and_html_are_carried() -> None:
    for msgtype, kind in (
        (MessageType.TEXT, "text"),
        (MessageType.NOTICE, "notice"),
        (MessageType.EMOTE, "emote"),
    ):
        content = kalandra_content(TextMessageEventContent(msgtype=msgtype, body="hi"))
        assert content == Content(body="hi", kind=kind)
    html = TextMessageEventContent(
        msgtype=MessageType.TEXT, body="hi", format=Format.HTML, formatted_body="<b>hi</b>"
    )
    converted = kalandra_content(html)
    assert converted is not None
    assert converted.formatted_body == "<b>hi</b>"
    back = matrix_content(converted)
    assert (back.body, back.formatted_body, back.format) == ("hi", "<b>hi</b>", Format.HTML)


def test_other_message_types_are_not_bridged_yet() -> None:
    assert kalandra_content(TextMessageEventContent(msgtype=MessageType.IMAGE, body="x")) is None


def test_member_names_are_readable_and_reversible() -> None:
    assert member_name("@alice.b:example.org") == "mx_alice.b__example.org"
    assert member_name("@we+ird=name:host:8448") == "mx_we_2bird_3dname__host__8448"
    # Once "mx_x_y_80" both: the mapping is injective now (it has an inverse).
    assert member_name("@x_y:80") != member_name("@x:y:80")
    for mxid in ("@x_y:80", "@x:y:80", "@Alice:Ex.org", "@é_:[::1]:8448", "@a__b:c", "@a:_:b"):
        assert mxid_of_member_name(member_name(mxid)) == mxid
    assert (
        mxid_of_member_name("mx_a__b_-0f0f0f") is None
    )  # a retried name (bridge/members/bridged_users.py)
    assert mxid_of_member_name("alice") is None
