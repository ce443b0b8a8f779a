"""Matrix users for tests: logged-in nio clients, syncing until something holds, sending.

nio keeps event callbacks for a client's lifetime: one client per test.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    Event,
    LoginResponse,
    RoomSendResponse,
    SyncResponse,
)
from nio.store import SqliteMemoryStore

from bridge.devstack.synapse import Synapse

PASSWORD = "correct horse battery staple"  # of every user the tests register


@asynccontextmanager
async def nio_client(
    synapse: Synapse, localpart: str, *, encrypted: bool = False
) -> AsyncIterator[AsyncClient]:
    """A logged-in Matrix user; ``encrypted``: with nio's E2EE (a new device, its keys
    uploaded, its store in memory). Logged out at the end (which deletes the device: each new
    room key goes to every one left)."""
    config = AsyncClientConfig(encryption_enabled=encrypted, store=SqliteMemoryStore)
    client = AsyncClient(synapse.url, synapse.mxid(localpart), config=config)
    try:
        login = await client.login(PASSWORD, device_name="test")
        assert isinstance(login, LoginResponse), login
        if encrypted and client.should_upload_keys:
            await client.keys_upload()
        yield client
    finally:
        if client.logged_in:
            await client.logout()
        await client.close()


async def sync_until(
    client: AsyncClient, predicate: Callable[[], bool], what: str, within: float = 15.0
) -> None:
    """Sync ``client`` (its callbacks run) until ``predicate()`` holds."""
    try:
        async with asyncio.timeout(within):
            while not predicate():
                response = await client.sync(timeout=500)
                assert isinstance(response, SyncResponse), response
    except TimeoutError:
        raise AssertionError(f"{client.user_id}: no {what} after {within} s") from None


async def next_in_room(
    client: AsyncClient,
    room_id: str,
    match: Callable[[Event], bool],
    what: str,
    within: float = 60.0,
) -> Event:
    """Sync ``client`` until an event of ``room_id`` that ``match`` accepts comes in one of
    these syncs (not one before: the caller owns the client's syncs). A sync after a burst
    has only the room's latest events: for the latest event, as a marker is, that is enough.
    In an encrypted room ``match`` sees what nio could decrypt."""
    try:
        async with asyncio.timeout(within):
            while True:
                response = await client.sync(timeout=500)
                assert isinstance(response, SyncResponse), response
                room = response.rooms.join.get(room_id)
                for event in room.timeline.events if room is not None else []:
                    if match(event):
                        return event
    except TimeoutError:
        raise AssertionError(f"{client.user_id}: no {what} after {within} s") from None


def text_of(event: Event, sender: str | None = None) -> str | None:
    """The body of a text message (of ``sender``, when given), else None."""
    source: dict[str, Any] = event.source
    if source.get("type") != "m.room.message" or sender not in (None, source.get("sender")):
        return None
    body = source.get("content", {}).get("body")
    return body if isinstance(body, str) else None


async def say(client: AsyncClient, room_id: str, body: str) -> str:
    """Send a text (in an encrypted room too); its event id."""
    if client.should_query_keys:  # devices that changed since (nio checks only new rooms)
        await client.keys_query()
    sent = await client.room_send(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        ignore_unverified_devices=True,  # encrypted rooms: the bridge's device is not verified
    )
    assert isinstance(sent, RoomSendResponse), sent
    return str(sent.event_id)


def numbered(i: int) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"matrix {i}"}


async def send_numbered(
    client: AsyncClient,
    room_id: str,
    count: int,
    *,
    content: Callable[[int], dict[str, Any]] = numbered,
    halfway: asyncio.Event | None = None,
    retry: bool = False,
    acked: list[str] | None = None,
    failed: list[int] | None = None,
) -> None:
    """Send messages 0 .. count - 1 in order (``content(i)``: "matrix i" by default), each
    once Synapse acknowledged the one before; ``halfway``: the second half once it is set.
    ``retry``: a failed send (Synapse down) is made again with the same transaction id, as a
    real client does (Synapse answers a repeat with the event it made), until Synapse
    acknowledges it; ``failed`` gets the number of each failed attempt, ``acked`` the event
    ids. Without ``retry`` a failure fails the test."""
    series = secrets.token_hex(4)  # transaction ids are the device's: unique to this call
    for i in range(count):
        if halfway is not None and i == count // 2:
            await halfway.wait()
        while True:
            try:
                sent = await client.room_send(
                    room_id, "m.room.message", content(i), tx_id=f"{series}-{i}"
                )
            except Exception:
                if not retry:
                    raise
                sent = None  # the server is down: any failure means again
            if isinstance(sent, RoomSendResponse):
                if acked is not None:
                    acked.append(sent.event_id)
                break
            assert retry, sent
            if failed is not None:
                failed.append(i)
            await asyncio.sleep(0.5)
