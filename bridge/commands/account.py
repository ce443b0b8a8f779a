"""Your Kalandra identity: fresh room keys (rotate-keys), and login codes and device tokens
(device-token)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from mautrix.api import HTTPAPI, Method, Path
from mautrix.bridge.commands import CommandEvent, command_handler
from mautrix.types import EventID, EventType, MessageType, TextMessageEventContent

from ..db.device_token import ID_LENGTH, ActiveToken, DeviceTokenTable, token_hash
from ..encryption import e2ee
from ..matrix_users import MatrixUser
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

if TYPE_CHECKING:
    from ..context import BridgeContext, BridgedMember


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


LOGIN_CODE_TTL = 600  # seconds: the longest the store allows

_LIMITATION = (
    "The Kalandra server binds one device key per member, and this member's key is the one"
    " the bridge holds for you (it signs what you send from Matrix). The code logs in only a"
    " client holding that key, and the bridge never hands the key out: two devices on one MLS"
    " leaf would reuse its sender keys. So `kalandra login --code`, which makes a new key, is"
    " refused (signature key does not match), and the code is used up by the attempt."
)
NOT_HERE = "Login codes are only given in an end-to-end encrypted direct chat with the bot."
UNENCRYPTED = (
    "A login code is a secret, and this chat is not end-to-end encrypted: the code would sit"
    " readable in the room's history on the homeserver. Start an encrypted direct chat with"
    " me (or turn on encryption here) and ask again. Nothing was issued."
)
NO_ENCRYPTION = (
    "This bridge has no end-to-end encryption (`bridge.encryption.allow`), so it gives no"
    " login codes in Matrix chats; a bridge admin can get one for you from the provisioning"
    " API. Nothing was issued."
)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


@command_handler(
    name="device-token",
    needs_auth=False,
    management_only=True,
    help_section=SECTION_ACCOUNT,
    help_args="[list | revoke <_token id or token_>]",
    help_text="A single-use login code (valid 10 minutes) for the Kalandra member the bridge"
    " holds for you, which `kalandra login --code` exchanges for a device token; given only in"
    " an end-to-end encrypted direct chat with the bot, never logged. `list` shows the member's"
    " active device tokens, `revoke` revokes one. Limitation: a member has one device key, and"
    " yours is the bridge's, so a native client bringing its own key is refused.",
)
@answers_failures
async def device_token(evt: CommandEvent) -> EventID:
    if portal_of(evt) is not None or not evt.is_management:
        raise CommandFailed(NOT_HERE)
    bridge = bridge_of(evt)
    sender = cast("MatrixUser", evt.sender)
    action = evt.args[0].lower() if evt.args else "issue"
    if action == "list" and len(evt.args) == 1:
        user = await bridge.bridged_users.get(sender.mxid, sender.level)
        issued = await _issued(DeviceTokenTable(bridge.db), user)
        if not issued:
            return await evt.reply(f"Member {user.member_id} has no device token from you.")
        lines = [f"Active device tokens of member {user.member_id}:"]
        lines += [f"* `{t.token_id}` issued {_when(t.created_at)}" for t in issued]
        return await evt.reply("\n".join(lines))
    if action == "revoke" and len(evt.args) == 2:
        user = await bridge.bridged_users.get(sender.mxid, sender.level)
        return await evt.reply(await _revoke(DeviceTokenTable(bridge.db), user, evt.args[1]))
    if evt.args:
        raise CommandFailed(
            "**Usage:** `$cmdprefix+sp device-token`, `device-token list`"
            " or `device-token revoke <token id>`"
        )
    # Refused before anything is made (member, token, code) when the chat is not encrypted.
    if e2ee.manager(bridge) is None:
        raise CommandFailed(NO_ENCRYPTION)
    if not await e2ee.room_is_encrypted(bridge, evt.room_id):
        raise CommandFailed(UNENCRYPTED)
    user = await bridge.bridged_users.get(sender.mxid, sender.level)
    code = await issue_login_code(bridge, user)
    return await _reply_secret(
        evt,
        f"Login code for Kalandra member {user.member_id}, valid for 10 minutes and once:\n\n"
        f"{code}\n\n`kalandra login --server URL --code {code}` exchanges it for a device"
        f" token. {_LIMITATION}",
    )


async def issue_login_code(bridge: BridgeContext, user: BridgedMember) -> str:
    """A login code for the user's member (also the provisioning API's)."""
    # Bind the bridge's key first: a native login must never bind its own and lock the
    # bridge out of this member.
    await user.connect()
    assert bridge.kalandra is not None
    return await bridge.kalandra.store.issue_login_code(user.member_id, LOGIN_CODE_TTL)


async def _reply_secret(evt: CommandEvent, text: str) -> EventID:
    """An end-to-end encrypted notice whose content the HTTP client never logs (mautrix logs
    request bodies at debug level unless they are marked sensitive)."""
    bridge = bridge_of(evt)
    api = evt.az.intent.api
    notice = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text)
    event_type, encrypted = await e2ee.encrypt(bridge, evt.room_id, EventType.ROOM_MESSAGE, notice)
    path = Path.v3.rooms[evt.room_id].send[str(event_type)][api.get_txn_id()]
    # (AppServiceAPI.request does not pass `sensitive` on: the base request, as the bot.)
    response = await HTTPAPI.request(
        api,
        Method.PUT,
        path,
        encrypted.serialize(),
        query_params={"user_id": evt.az.bot_mxid},
        sensitive=True,
    )
    return EventID(response["event_id"])


async def _issued(table: DeviceTokenTable, user: BridgedMember) -> list[ActiveToken]:
    """The member's active tokens but the bridge's own (its session for the member)."""
    own = None if user.token is None else token_hash(user.token)
    return [t for t in await table.active(user.member_id) if t.token_hash != own]


async def _revoke(table: DeviceTokenTable, user: BridgedMember, given: str) -> str:
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
