"""Your Kalandra identity: fresh room keys (rotate-keys) and device tokens (device-token)."""

from __future__ import annotations

import time
from typing import cast

from mautrix.api import HTTPAPI, Method, Path
from mautrix.bridge.commands import CommandEvent, command_handler
from mautrix.types import EventID, EventType, MessageType, TextMessageEventContent

from ..bridged_user import BridgedUser
from ..db.device_token import ID_LENGTH, ActiveToken, DeviceTokenTable, token_hash, token_id
from ..user import User
from .util import (
    ROOM_ARG,
    SECTION_ACCOUNT,
    CommandFailed,
    active_room,
    answers_failures,
    bridge_of,
    portal_of,
    take_room,
)


@command_handler(
    name="rotate-keys",
    needs_auth=False,
    help_section=SECTION_ACCOUNT,
    help_args=ROOM_ARG,
    help_text="Start a new MLS epoch in a Kalandra room with a self-update commit of the"
    " bridge's own leaf: fresh group secrets, so every sender key in the room, yours included"
    " (they derive from the epoch's secret), is new. Your bridged member's own leaf is not"
    " updated: only its owner can commit that, and the bridge keeps no secret of that leaf"
    " (its private init key is dropped once you are added); its signing key stays.",
)
@answers_failures
async def rotate_keys(evt: CommandEvent) -> EventID:
    room_id, _ = await take_room(evt, evt.args)
    before = active_room(evt, room_id).epoch
    bot = bridge_of(evt).bot
    assert bot.client is not None
    async with bot.commit_lock:
        index = await bot.client.self_update(room_id)
        await bot.state.flush()
    after = active_room(evt, room_id).epoch
    return await evt.reply(
        f"New keys in `{room_id.hex()}`: epoch {before} → {after} (commit at log index {index})."
    )


_LIMITATION = (
    "The Kalandra server binds one device key per member, and this member's key is the one"
    " the bridge holds for you (it signs what you send from Matrix). A native client can log"
    " in with this token only with that key, and the bridge never hands it out: two devices"
    " on one MLS leaf would reuse its sender keys. So `kalandra login`, which makes a new key,"
    " is refused (signature key does not match)."
)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


@command_handler(
    name="device-token",
    needs_auth=False,
    management_only=True,
    help_section=SECTION_ACCOUNT,
    help_args="[list | revoke <_token id or token_>]",
    help_text="Issue a device token for the Kalandra member the bridge holds for you (only in"
    " this management room; it is never logged), list your active tokens, or revoke one."
    " Limitation: a member has one device key, and yours is the bridge's, so a native client"
    " bringing its own key (`kalandra login`) is refused with this token.",
)
@answers_failures
async def device_token(evt: CommandEvent) -> EventID:
    if portal_of(evt) is not None or not evt.is_management:
        raise CommandFailed("Device tokens are only given in your management room with the bot.")
    bridge = bridge_of(evt)
    sender = cast("User", evt.sender)
    user = await BridgedUser.get(bridge, sender.mxid, sender.level)
    table = DeviceTokenTable(bridge.db)
    action = evt.args[0].lower() if evt.args else "issue"
    if action == "list" and len(evt.args) == 1:
        issued = await _issued(table, user)
        if not issued:
            return await evt.reply(f"Member {user.member_id} has no device token from you.")
        lines = [f"Active device tokens of member {user.member_id}:"]
        lines += [f"* `{t.token_id}` issued {_when(t.created_at)}" for t in issued]
        return await evt.reply("\n".join(lines))
    if action == "revoke" and len(evt.args) == 2:
        return await evt.reply(await _revoke(table, user, evt.args[1]))
    if evt.args:
        raise CommandFailed(
            "**Usage:** `$cmdprefix+sp device-token`, `device-token list`"
            " or `device-token revoke <token id>`"
        )
    # Bind the bridge's key first: a native login must never bind its own and lock the
    # bridge out of this member.
    await user.connect()
    assert bridge.kalandra is not None
    token = await bridge.kalandra.store.issue_token(user.member_id)
    return await _reply_secret(
        evt,
        f"Device token for Kalandra member {user.member_id} (token id {token_id(token)}):\n\n"
        f"{token}\n\nKeep it secret; `device-token revoke {token_id(token)}` revokes it."
        f" {_LIMITATION}",
    )


async def _reply_secret(evt: CommandEvent, text: str) -> EventID:
    """A notice whose content the HTTP client never logs (mautrix logs request bodies at
    debug level unless they are marked sensitive)."""
    api = evt.az.intent.api
    content = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text)
    path = Path.v3.rooms[evt.room_id].send[EventType.ROOM_MESSAGE.t][api.get_txn_id()]
    # (AppServiceAPI.request does not pass `sensitive` on: the base request, as the bot.)
    response = await HTTPAPI.request(
        api,
        Method.PUT,
        path,
        content.serialize(),
        query_params={"user_id": evt.az.bot_mxid},
        sensitive=True,
    )
    return EventID(response["event_id"])


async def _issued(table: DeviceTokenTable, user: BridgedUser) -> list[ActiveToken]:
    """The member's active tokens but the bridge's own (its session for the member)."""
    own = None if user.token is None else token_hash(user.token)
    return [t for t in await table.active(user.member_id) if t.token_hash != own]


async def _revoke(table: DeviceTokenTable, user: BridgedUser, given: str) -> str:
    issued = await _issued(table, user)
    if len(given) > ID_LENGTH:  # the token itself
        matches = [t for t in issued if t.token_hash == token_hash(given)]
    elif len(given) < 6:
        return "Give at least 6 characters of the token id (see `device-token list`)."
    else:
        matches = [t for t in issued if t.token_id.startswith(given.lower())]
    if len(matches) > 1:
        return f"`{given}` matches {len(matches)} tokens; give more of the token id."
    if not matches or not await table.revoke(user.member_id, matches[0].token_hash):
        return f"No active device token `{given}` of member {user.member_id}."
    return (
        f"Revoked device token `{matches[0].token_id}` of member {user.member_id}."
        " (A client already logged in with it stays connected until it disconnects.)"
    )
