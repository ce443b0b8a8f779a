"""What the bridge knows of a Kalandra room: members, epoch, and a re-sync on demand."""

from __future__ import annotations

from mautrix.bridge.commands import CommandEvent, command_handler
from mautrix.types import EventID

from kalandra_core.mls.keypackage import SUITE_X25519_AES128GCM, SUITE_X25519_CHACHA20
from kalandra_core.storage.base import Role

from ..db.roster import bridged_mxids
from .util import ROOM_ARG, SECTION_ROOMS, active_room, answers_failures, bridge_of, take_room

SUITE_NAMES = {
    SUITE_X25519_AES128GCM: "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
    SUITE_X25519_CHACHA20: "MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519",
}
_ROLES = {Role.OWNER: "owner", Role.MODERATOR: "moderator"}


@command_handler(
    needs_auth=False,
    help_section=SECTION_ROOMS,
    help_args=ROOM_ARG,
    help_text="List a Kalandra room's members (from the bridge's MLS state): member id, account"
    " name, and whether each is native, a bridged Matrix user or the bridge bot.",
)
@answers_failures
async def members(evt: CommandEvent) -> EventID:
    room_id, _ = await take_room(evt, evt.args)
    room = active_room(evt, room_id)
    bridge = bridge_of(evt)
    assert bridge.kalandra is not None
    store = bridge.kalandra.store
    state = await store.load_room(room_id)
    bridged = await bridged_mxids(bridge.db)
    bot_id = bridge.bot.member_id
    lines = [f"Members of `{room_id.hex()}` at epoch {room.epoch}:"]
    for member_id in sorted(room.roster()):
        account = await store.get_member(member_id)
        name = account.name if account is not None else "?"
        if member_id == bot_id:
            kind = "the bridge bot"
        elif member_id in bridged or member_id in bridge.bridged_users.member_ids:
            kind = f"bridged Matrix user {bridged.get(member_id, '(unknown)')}"
        else:
            kind = "native"
        role = None
        if state is not None and member_id in state.members:
            role = _ROLES.get(state.members[member_id].role)
        lines.append(f"* {member_id} `{name}`: {kind}" + (f" ({role})" if role else ""))
    return await evt.reply("\n".join(lines))


@command_handler(
    needs_auth=False,
    help_section=SECTION_ROOMS,
    help_args=ROOM_ARG,
    help_text="Show a Kalandra room's MLS epoch, cipher suite, tree hash and member count, as"
    " the bridge's own group state has them.",
)
@answers_failures
async def epoch(evt: CommandEvent) -> EventID:
    room_id, _ = await take_room(evt, evt.args)
    room = active_room(evt, room_id)
    group = room.group
    suite = SUITE_NAMES.get(group.suite, f"0x{group.suite:04x}")
    return await evt.reply(
        f"Kalandra room `{room_id.hex()}`: epoch {room.epoch}, cipher suite `{suite}`,"
        f" tree hash `{group.tree_hash.hex()}`, {len(room.roster())} members,"
        f" log applied up to index {room.last_seen}."
    )


@command_handler(
    needs_auth=False,
    help_section=SECTION_ROOMS,
    help_args=ROOM_ARG,
    help_text="Catch up a Kalandra room from the server now, and tell the log index reached.",
)
@answers_failures
async def sync(evt: CommandEvent) -> EventID:
    room_id, _ = await take_room(evt, evt.args)
    before = active_room(evt, room_id).last_seen
    client = bridge_of(evt).bot.client
    assert client is not None
    await client.sync(room_id)
    after = active_room(evt, room_id).last_seen
    return await evt.reply(
        f"Synced `{room_id.hex()}`: log applied up to index {after}"
        f" ({after - before} new entries)."
    )
