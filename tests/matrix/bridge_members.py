"""Helpers for Kalandra -> Matrix membership tests: a Kalandra room owned by a native member
(so it can moderate) and opened as a portal, the portal's epoch state and memberships as a
Matrix user sees them, and waiting for them to change."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from nio import (
    AsyncClient,
    InviteMemberEvent,
    MatrixRoom,
    RoomGetStateEventResponse,
    RoomMemberEvent,
)

from kalandra_core.client.driver import Client
from kalandra_core.storage.sql import SqlStore
from matrix.bridge_stack import BridgeStack, bot_notices, open_dm, say, sync_until

EPOCH = "org.kalandra.epoch"


async def wait_until(check: Callable[[], Awaitable[Any]], what: str, within: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy; return that."""
    try:
        async with asyncio.timeout(within):
            while not (result := await check()):  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.5)
            return result
    except TimeoutError:
        raise AssertionError(f"no {what} after {within} s") from None


async def epoch_state(client: AsyncClient, room_id: str) -> dict[str, Any] | None:
    response = await client.room_get_state_event(room_id, EPOCH, "")
    return response.content if isinstance(response, RoomGetStateEventResponse) else None


async def wait_epoch(
    client: AsyncClient,
    room_id: str,
    members: set[int],
    within: float = 60.0,
    *,
    epoch: int | None = None,
) -> dict[str, Any]:
    """The epoch state once it counts exactly ``members`` (and is at ``epoch``, if given). The
    state carries the member count, not the roster: the roster is the room's membership."""

    async def check() -> dict[str, Any] | None:
        state = await epoch_state(client, room_id)
        if state is None or state.get("member_count") != len(members):
            return None
        return state if epoch is None or state["epoch"] == epoch else None

    what = f"epoch state with {len(members)} members" + (f" at {epoch}" if epoch else "")
    result: dict[str, Any] = await wait_until(check, what, within)
    return result


async def member_event(client: AsyncClient, room_id: str, user: str) -> dict[str, Any]:
    """The user's m.room.member event content in the room ({} when there is none)."""
    response = await client.room_get_state_event(room_id, "m.room.member", user)
    return response.content if isinstance(response, RoomGetStateEventResponse) else {}


async def wait_membership(
    client: AsyncClient, room_id: str, user: str, membership: str, within: float = 60.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        content = await member_event(client, room_id, user)
        return content if content.get("membership") == membership else None

    result: dict[str, Any] = await wait_until(check, f"{user} {membership}", within)
    return result


def member_events(history: list[Any], user: str) -> list[tuple[str, str]]:
    """(membership, sender) of each m.room.member event about ``user``, oldest first."""
    return [
        (e.membership, e.sender)
        for e in history
        if isinstance(e, RoomMemberEvent) and e.state_key == user
    ]


async def native_room(owner: Client, bot_id: int, name: str) -> bytes:
    """A room the native ``owner`` creates (owner role: it may moderate) with the bot added."""
    room_id = await owner.create_room(name=name)
    await owner.invite(room_id, [bot_id])
    await owner.settle()
    return room_id


async def open_portal(alice: AsyncClient, room_id: bytes) -> str:
    """``!kalandra open`` in a DM with the bot; alice joins the portal. Returns its room id."""
    await alice.sync(timeout=0)
    dm = await open_dm(alice)
    notices = bot_notices(alice, dm)
    await sync_until(alice, lambda: len(notices) >= 1, "welcome from the bot")
    invites: list[str] = []

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == alice.user_id and event.membership == "invite":
            invites.append(room.room_id)

    alice.add_event_callback(on_invite, InviteMemberEvent)
    async with asyncio.timeout(60):
        # The bot may not have taken the Welcome yet: ask again until it has.
        while True:
            seen = len(notices)
            await say(alice, dm, f"!kalandra open {room_id.hex()}")

            def answered(seen: int = seen) -> bool:
                return len(notices) > seen

            await sync_until(alice, answered, "an answer to open", 30)
            if re.match(r"Portal of", notices[seen]):
                break
            await asyncio.sleep(1)
    await sync_until(alice, lambda: bool(invites), "the portal invite", 30)
    portal = invites[0]
    await alice.join(portal)
    await sync_until(alice, lambda: portal in alice.rooms, "the join")
    return portal


async def account_id(stack: BridgeStack, name: str) -> int:
    """The member id of the Kalandra account ``name`` in the bridge's database."""
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.find_member(name)
    finally:
        await store.close()
    assert account is not None, name
    return account.member_id


async def account_name(stack: BridgeStack, member_id: int) -> str:
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.get_member(member_id)
    finally:
        await store.close()
    assert account is not None, member_id
    return account.name
