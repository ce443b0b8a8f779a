"""A bounded soak of the whole bridge: one stack (Synapse + ``python -m bridge``), three portals
(the last one encrypted, end to bridge), a native member and the Matrix user sending text both
ways in each, small images (plain portals) and reactions mixed in, while the harness cycles
through faults: kill -9 of the bridge, kill -9 of Synapse, a PostgreSQL restart (on
PostgreSQL), and bad items that must be set aside with a notice instead of blocking a portal.

At the end every message that either side acknowledged is on the other side exactly once, in
order (except a Matrix message whose room key was lost while the bridge was down: it is
bridged when the key comes, after later ones, so only "exactly once" holds for it); every
item set aside has its failure status and notice; a final message each way
arrives in every portal (no queue is stuck). It prints what was sent, bridged and set aside and
the worst catch-up after a restart of the bridge (from ready to the first/last message the
Matrix user sent while it was down reaching the native member).

Length: ``KALANDRA_SOAK_SECONDS`` of traffic (60 by default, for CI; ``make bench-full`` runs
600). Databases: ``KALANDRA_SOAK_DATABASES`` (comma-separated); by default SQLite alone for
runs under 5 minutes (both would exceed the CI budget) and both databases for longer ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from faults.private_postgres import PrivatePostgres, private_postgres
from matrix.bridge_stack import (
    BOT,
    PASSWORD,
    PG_ADMIN_DSN,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    ghost_of,
    native_client,
    portal_with_native,
    sync_until,
    timeline,
)
from nio import (
    AsyncClient,
    AsyncClientConfig,
    LoginResponse,
    RoomCreateResponse,
    RoomKeyRequest,
    RoomSendResponse,
    SyncResponse,
    UploadResponse,
)
from nio.store import SqliteMemoryStore

from kalandra_core.client import events as ev
from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client, ClientError, NotYetConfirmed
from kalandra_core.client.extras import react
from kalandra_core.mls.errors import PendingCommitExists

PART_KEY = "org.kalandra.part"  # in each part of a split text: its number, from 0

SECONDS = float(os.environ.get("KALANDRA_SOAK_SECONDS", "60"))
SOAK_DATABASES = tuple(
    os.environ.get("KALANDRA_SOAK_DATABASES", "sqlite,postgres" if SECONDS >= 300 else "sqlite")
    .replace(" ", "")
    .split(",")
)
FAULT_EVERY = 10.0 if SECONDS < 300 else 30.0  # seconds of traffic between two faults
SEND_EVERY = 1.0  # seconds between two messages of one sender
WITHIN = 300.0  # seconds for the backlog to drain after the traffic, on a loaded 2-core machine
MEDIA_LIMIT = 256 * 1024  # server.media.max_size of this stack: the oversized file is cheap
STATUS = "com.beeper.message_send_status"
NOT_BRIDGED = "Not bridged to Kalandra:"
PORTALS = 3  # the last one is encrypted
SERVERS: dict[Path, PrivatePostgres | None] = {}  # the stack's own PostgreSQL server, by stack


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=SOAK_DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    # asyncpg logs each failed reconnect of its pools with a traceback (at WARNING) while
    # PostgreSQL is down: that is the outage this soak makes.
    options = {"server.media.max_size": MEDIA_LIMIT, "logging.loggers.asyncpg": {"level": "ERROR"}}
    with contextlib.ExitStack() as servers:
        # A PostgreSQL server of the soak's own: it stops it (others may use the shared one).
        postgres = (
            servers.enter_context(private_postgres()) if request.param == "postgres" else None
        )
        async with bridge_stack(
            tmp_path_factory.mktemp("soak"),
            request.param,
            bridge_options={"encryption.allow": True},
            options=options,
            pg_admin=postgres.admin_dsn if postgres is not None else PG_ADMIN_DSN,
        ) as stack:
            SERVERS[stack.work] = postgres
            yield stack


def png(side: int) -> bytes:
    """A small real RGB PNG."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        )

    rows = b"".join(
        b"\x00" + b"".join(bytes([x * 16 % 256, y * 16 % 256, 99]) for x in range(side))
        for y in range(side)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


# --- what each side did and saw ----------------------------------------------------------------

# An item of a portal's stream, as both sides can compare it: ("m", body) for a message (text
# or image), ("r", key) for a reaction; every body and key is unique in the soak.
Item = tuple[str, str]


@dataclass
class Portal:
    index: int
    room: bytes  # the Kalandra room
    room_id: str  # its portal
    native: Client
    ghost: str
    encrypted: bool
    native_sent: list[Item] = field(default_factory=list)  # acknowledged (or queued by its client)
    matrix_sent: list[Item] = field(default_factory=list)  # acknowledged by Synapse
    matrix_acked_at: dict[str, float] = field(default_factory=dict)  # body -> time of the ack
    matrix_events: dict[str, str] = field(default_factory=dict)  # event id -> body
    reaction_targets: dict[str, str] = field(default_factory=dict)  # reaction key -> event id
    received: list[tuple[int, Item]] = field(default_factory=list)  # (log index, item), native
    arrived_at: dict[str, float] = field(default_factory=dict)  # body -> arrival, native side
    set_aside: list[str] = field(default_factory=list)  # Matrix event ids of the bad items
    # Native requests that timed out unconfirmed and are not kept by the client (reactions):
    # each may or may not have reached the server, so may arrive once or not at all.
    uncertain: set[Item] = field(default_factory=set)
    images: int = 0
    oversized_due: int = 0  # oversized texts the native sender is to send next (an injector's)
    oversized: int = 0  # sent


@dataclass
class Soak:
    stack: BridgeStack
    alice: AsyncClient
    portals: list[Portal]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: list[tuple[float, float]] = field(default_factory=list)  # bridge (killed, ready)
    faults: Counter[str] = field(default_factory=Counter)


async def native_member(stack: BridgeStack) -> Client:
    """A native member whose client reports reactions."""
    return await native_client(stack, 4, extended=True)


@contextlib.asynccontextmanager
async def matrix_user(stack: BridgeStack) -> AsyncIterator[AsyncClient]:
    """The Matrix user, with E2EE, giving up on a request as soon as the connection fails (nio
    would retry by itself): the senders below retry with the same transaction id, as a real
    client does, so only what Synapse acknowledged counts as sent."""
    config = AsyncClientConfig(
        encryption_enabled=True, store=SqliteMemoryStore, max_timeouts=0, request_timeout=20
    )
    client = AsyncClient(stack.synapse.url, stack.synapse.mxid(stack.user), config=config)
    try:
        login = await client.login(PASSWORD, device_name="soak")
        assert isinstance(login, LoginResponse), login
        if client.should_upload_keys:
            await client.keys_upload()
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.logout()
        await client.close()


async def encrypted_portal(alice: AsyncClient, native: Client, name: str) -> tuple[str, str]:
    """A portal whose Matrix room is encrypted: made plain, unbridged, and the Kalandra room
    bridged into an encrypted room of the Matrix user's."""
    room_hex, plain = await portal_with_native(alice, native, name)
    answer = await command(alice, plain, "!kalandra unbridge")
    assert answer.startswith(f"Unbridging Kalandra room `{room_hex}`"), answer
    created = await alice.room_create(
        name=name,
        invite=[BOT],
        initial_state=[
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ],
        power_level_override={"users": {BOT: 100}},
    )
    assert isinstance(created, RoomCreateResponse), created
    room = created.room_id
    notices = bot_notices(alice, room)
    await sync_until(alice, lambda: len(notices) >= 1, "the bot's welcome")  # then commands
    answer = await command(alice, room, f"!kalandra bridge {room_hex}", within=30)
    assert answer.startswith(f"This room is now the portal of Kalandra room `{room_hex}`"), answer
    assert alice.rooms[room].encrypted
    return room_hex, room


async def history(client: AsyncClient, room_id: str) -> list[Any]:
    """The room's timeline, oldest first, from the background sync's position (no sync here:
    :func:`syncing` owns the client's syncs)."""
    return await timeline(client, room_id)


def matrix_item(event: Any) -> Item | None:
    """What a ghost's event is, as an Item; undecryptable ones show as ("?", event id)."""
    source: dict[str, Any] = event.source
    kind = source.get("type")
    content = source.get("content", {})
    if kind == "m.room.encrypted":
        return ("?", str(source.get("event_id")))
    if kind == "m.room.message":
        return ("m", str(content.get("body")))
    if kind == "m.reaction":
        return ("r", str(content.get("m.relates_to", {}).get("key")))
    return None


async def ghost_items(alice: AsyncClient, portal: Portal) -> list[Item]:
    """The ghost's items, oldest first; the parts of a split text joined into one."""
    items: list[Item] = []
    for event in await history(alice, portal.room_id):
        if event.sender != portal.ghost or (item := matrix_item(event)) is None:
            continue
        if event.source.get("content", {}).get(PART_KEY, 0) > 0 and items:
            items[-1] = ("m", items[-1][1] + item[1])  # parts arrive in order, nothing between
        else:
            items.append(item)
    return items


@contextlib.asynccontextmanager
async def syncing(client: AsyncClient) -> AsyncIterator[None]:
    """The Matrix user syncs in the background (room keys come in), through Synapse's
    restarts, and answers the bot's room key requests as Element does (a key lost while the
    bridge was down is requested again)."""
    from matrix.test_bridge_encryption import forward_key

    async def loop() -> None:
        while True:
            try:
                response = await client.sync(timeout=500)
            except Exception:  # Synapse is down: again
                await asyncio.sleep(0.5)
                continue
            if not isinstance(response, SyncResponse):
                await asyncio.sleep(0.5)
                continue
            for event in response.to_device_events:
                if isinstance(event, RoomKeyRequest) and event.sender == BOT:
                    with contextlib.suppress(Exception):
                        await forward_key(client, event)
            with contextlib.suppress(Exception):
                await client.send_to_device_messages()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the two sides' traffic ----------------------------------------------------------------------


async def matrix_send(
    soak: Soak, room_id: str, kind: str, content: dict[str, Any], tx: str
) -> str:
    """Send until Synapse acknowledges (same transaction id each time); the event id."""
    while True:
        try:
            sent = await soak.alice.room_send(
                room_id, kind, content, tx_id=tx, ignore_unverified_devices=True
            )
        except Exception:  # Synapse is down: again
            sent = None
        if isinstance(sent, RoomSendResponse):
            return str(sent.event_id)
        await asyncio.sleep(0.5)


async def matrix_upload(soak: Soak, data: bytes, name: str) -> str:
    while True:
        try:
            response, _ = await soak.alice.upload(
                io.BytesIO(data), content_type="image/png", filename=name, filesize=len(data)
            )
        except Exception:
            response = None
        if isinstance(response, UploadResponse):
            return str(response.content_uri)
        await asyncio.sleep(0.5)


async def matrix_sender(soak: Soak, portal: Portal, *, final: bool = False) -> None:
    """Text, an image every 10th (plain portals), a reaction to its own last message every
    7th, until the soak stops; ``final``: only the final text."""
    last_event: str | None = None
    i = 0
    while True:
        i += 1
        if soak.stop.is_set() and not final:
            return
        body = f"m{portal.index}.final" if final else f"m{portal.index}.{i}"
        if not final and i % 7 == 0 and last_event is not None:
            key = f"m{portal.index}.r{i}"
            relates = {"rel_type": "m.annotation", "event_id": last_event, "key": key}
            await matrix_send(soak, portal.room_id, "m.reaction", {"m.relates_to": relates}, key)
            portal.reaction_targets[key] = last_event
            portal.matrix_sent.append(("r", key))
        else:
            content: dict[str, Any] = {"msgtype": "m.text", "body": body}
            if not final and i % 10 == 0 and not portal.encrypted:
                data = png(8)
                uri = await matrix_upload(soak, data, f"{body}.png")
                info = {"mimetype": "image/png", "size": len(data), "w": 8, "h": 8}
                content = {"msgtype": "m.image", "body": body, "url": uri, "info": info}
            last_event = await matrix_send(soak, portal.room_id, "m.room.message", content, body)
            portal.matrix_events[last_event] = body
            portal.matrix_sent.append(("m", body))
            portal.matrix_acked_at[body] = time.monotonic()
        if final:
            return
        await asyncio.sleep(SEND_EVERY)


class Unconfirmed(Exception):
    """A request that timed out and that its client does not keep (not in its outbox)."""


async def native_again(native: Client, action: Callable[[], Awaitable[int]]) -> int | None:
    """The request's log index once the server took it; None when its client queued it (it
    goes out once, never to be sent again); Unconfirmed when it timed out and is not kept.
    Refused (STORAGE_ERROR while PostgreSQL is down), or the client's own commit still on its
    way: again once it is connected."""
    while True:
        try:
            return await action()
        except NotYetConfirmed:
            return None
        except TimeoutError:
            raise Unconfirmed from None
        except (ClientError, PendingCommitExists):
            await asyncio.sleep(0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(native.wait_connected(), 30)


async def native_sender(soak: Soak, portal: Portal, *, final: bool = False) -> None:
    """As :func:`matrix_sender`, from the native member."""
    native, room = portal.native, portal.room
    last_index: int | None = None
    i = 0
    while True:
        i += 1
        if soak.stop.is_set() and not final:
            return
        body = f"n{portal.index}.final" if final else f"n{portal.index}.{i}"
        if not final and portal.oversized_due:
            # Sent by this task, so that native_sent stays in the order of the log.
            big = oversized_text(body)
            last_index = await native_again(
                native, functools.partial(native.send, room, Content(body=big))
            )
            portal.native_sent.append(("m", big))
            portal.oversized_due -= 1
            portal.oversized += 1
        elif not final and i % 7 == 0 and last_index is not None:
            key, target = f"n{portal.index}.r{i}", last_index
            try:
                await native_again(native, functools.partial(react, native, room, target, key))
                portal.native_sent.append(("r", key))
            except Unconfirmed:
                portal.uncertain.add(("r", key))
        else:
            content = Content(body=body)
            if not final and i % 10 == 0 and not portal.encrypted:
                while True:  # an upload that failed is simply made again
                    try:
                        ref = await native.upload_media(
                            room, png(8), mimetype="image/png", name=f"{body}.png", kind="image"
                        )
                        break
                    except Exception:
                        await asyncio.sleep(0.5)
                content = Content(body=body, kind="image", media=ref)
            last_index = await native_again(native, functools.partial(native.send, room, content))
            portal.native_sent.append(("m", body))
        if final:
            return
        await asyncio.sleep(SEND_EVERY)


async def native_receiver(portal: Portal) -> None:
    """What the native member gets from the Matrix user: messages and reactions."""
    native = portal.native
    mine = native.core.member_id

    async def messages() -> None:
        while True:
            message = await native.messages.get()
            if message.room_id == portal.room and message.sender_id != mine:
                body = message.content.body
                portal.received.append((message.log_index, ("m", body)))
                portal.arrived_at.setdefault(body, time.monotonic())
                portal.images += message.content.kind == "image"

    async def reactions() -> None:
        while True:
            event = await native.events.get()
            if (
                isinstance(event, ev.Reacted)
                and event.room_id == portal.room
                and event.sender_id != mine
                and event.add
            ):
                portal.received.append((event.log_index, ("r", event.key)))

    await asyncio.gather(messages(), reactions())


def native_items(portal: Portal) -> list[Item]:
    return [item for _, item in sorted(portal.received)]


# --- faults and bad items ----------------------------------------------------------------------


async def kill9_bridge(soak: Soak) -> None:
    await soak.stack.kill9()
    killed = time.monotonic()
    await asyncio.sleep(2)  # an outage: the Matrix user's messages pile up in Synapse
    await soak.stack.restart()
    soak.restarts.append((killed, time.monotonic()))


async def kill9_synapse(soak: Soak) -> None:
    """SIGKILL Synapse (it forgets its unsent appservice queue), start it again."""
    await soak.stack.kill9_synapse(down=3)


OUTAGE_SECONDS = 20.0  # longer than any fixed retry budget: an outage is waited out


async def restart_pg(soak: Soak) -> None:
    """The soak's PostgreSQL server stops (connections cut) and starts again."""
    postgres = SERVERS[soak.stack.work]
    assert postgres is not None
    await asyncio.to_thread(postgres.stop)
    try:
        await asyncio.sleep(OUTAGE_SECONDS)
    finally:
        await asyncio.to_thread(postgres.start)


Fault = Callable[[Soak], Awaitable[None]]


def faults(database: str) -> list[Fault]:
    return [kill9_bridge, kill9_synapse, *([restart_pg] if database == "postgres" else [])]


async def oversized_file(soak: Soak, portal: Portal) -> None:
    """A Matrix file over server.media.max_size: refused for good (FAIL_PERMANENT status and a
    notice); the portal's later messages flow on."""
    if portal.encrypted:
        return
    data = os.urandom(MEDIA_LIMIT + 1024)
    uri = await matrix_upload(soak, data, "huge.bin")
    content = {
        "msgtype": "m.file",
        "body": "huge.bin",
        "url": uri,
        "info": {"mimetype": "application/octet-stream", "size": len(data)},
    }
    tx = f"soak-bad-{portal.index}-{len(portal.set_aside)}"
    portal.set_aside.append(await matrix_send(soak, portal.room_id, "m.room.message", content, tx))


def oversized_text(name: str) -> str:
    """A unique native text too large for one Matrix event (~75 KiB)."""
    return "".join(f"{name} line {i:04d}: the quick brown fox jumps\n" for i in range(1800))


async def oversized_native_text(soak: Soak, portal: Portal) -> None:
    """A native text over Matrix's event size: it arrives split, whole (ghost_items joins the
    parts), and the portal's later messages flow on."""
    portal.oversized_due += 1


# Bad items injected after each fault (into the portals in turn). The message of a ghost banned
# in Matrix (set aside with a notice) is not among them: in these portals the bot moderates the
# Kalandra room, so the ban removes the member from Kalandra too (a native owner's room is
# needed, as in tests/matrix/test_bridge_no_stall.py, which covers it with a kill -9).
Injector = Callable[[Soak, Portal], Awaitable[None]]
INJECTORS: list[Injector] = [oversized_file, oversized_native_text]


QUIET_WAIT = 30.0  # issue 12's target for catching up after a restart with no other traffic


async def quiet_restart(soak: Soak) -> str:
    """With no other traffic: kill -9 the bridge, the Matrix user sends two messages into each
    portal, the bridge starts again; how it caught up (a line for the summary)."""
    await soak.stack.kill9()
    killed = time.monotonic()
    missed = []
    for portal in soak.portals:
        for k in range(2):
            body = f"m{portal.index}.quiet{k}"
            content = {"msgtype": "m.text", "body": body}
            await matrix_send(soak, portal.room_id, "m.room.message", content, body)
            portal.matrix_sent.append(("m", body))
            portal.matrix_acked_at[body] = time.monotonic()
            missed.append((portal, body))
    await soak.stack.restart()
    ready = time.monotonic()
    soak.restarts.append((killed, ready))

    def arrived() -> bool:
        return all(body in portal.arrived_at for portal, body in missed)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(QUIET_WAIT):
            while not arrived():  # noqa: ASYNC110 - the native clients' tasks fill arrived_at
                await asyncio.sleep(0.2)
    if arrived():
        last = max(portal.arrived_at[body] for portal, body in missed) - ready
        return f"caught up by itself in {last:.1f} s"
    got = sum(body in portal.arrived_at for portal, body in missed)
    raise AssertionError(
        f"not caught up by itself within {QUIET_WAIT:.0f} s of the bridge being ready"
        f" ({got} of {len(missed)} missed messages arrived)"
    )


# --- the checks ---------------------------------------------------------------------------------


def compare(
    sent: list[Item],
    seen: list[Item],
    uncertain: AbstractSet[Item] = frozenset(),
    late: AbstractSet[Item] = frozenset(),
) -> str:
    """'' when ``seen`` is ``sent`` (with the ``uncertain`` items at most once each, the
    ``late`` ones exactly once, anywhere); else which items are missing, duplicated, out of
    order."""
    twice = [item for item, n in Counter(i for i in seen if i in uncertain).items() if n > 1]
    seen = [item for item in seen if item not in uncertain or item in twice]
    counts = Counter(seen)
    if all(counts[item] == 1 for item in late):
        seen = [item for item in seen if item not in late]
        sent = [item for item in sent if item not in late]
    if seen == sent:
        return ""
    counts, expected = Counter(seen), set(sent)
    missing = [item for item in sent if item not in counts]
    extra = [item for item in counts if item not in expected]
    duplicated = [item for item, n in counts.items() if n > 1]
    first = next((n for n, (a, b) in enumerate(zip(sent, seen, strict=False)) if a != b), None)
    return (
        f"sent {len(sent)}, seen {len(seen)}; missing {missing[:20]}; duplicated "
        f"{duplicated[:20]}; unexpected {extra[:20]}; first difference at {first}: "
        f"{sent[first : first + 3] if first is not None else '-'} vs "
        f"{seen[first : first + 3] if first is not None else '-'}"
    )


LATE = re.compile(r"room key of event (\S+) arrived late: bridging it now")


def bridged_late(soak: Soak, portal: Portal) -> set[Item]:
    """The Matrix messages whose room key came after later messages were bridged (see the
    README: a key lost while the bridge was down is asked for again; its message is bridged
    when it comes, after the rest), and the reactions to them (held, then bridged right after
    their target)."""
    log = soak.stack.log.read_text(errors="replace")
    late = {event_id for event_id in LATE.findall(log) if event_id in portal.matrix_events}
    return {("m", portal.matrix_events[event_id]) for event_id in late} | {
        ("r", key) for key, target in portal.reaction_targets.items() if target in late
    }


async def differences(soak: Soak) -> list[str]:
    found = []
    for portal in soak.portals:
        late = bridged_late(soak, portal)
        if to_native := compare(portal.matrix_sent, native_items(portal), late=late):
            found.append(f"portal {portal.index}, Matrix -> native: {to_native}")
        if to_matrix := compare(
            portal.native_sent, await ghost_items(soak.alice, portal), portal.uncertain
        ):
            found.append(f"portal {portal.index}, native -> Matrix: {to_matrix}")
    return found


async def set_aside_reports(soak: Soak, portal: Portal) -> tuple[list[str], int]:
    """The bad items' event ids without a FAIL_PERMANENT status; the bot's refusal notices."""
    statuses, notices = {}, 0
    for event in await history(soak.alice, portal.room_id):
        content = event.source.get("content", {})
        if event.source.get("type") == STATUS:
            statuses[content.get("m.relates_to", {}).get("event_id")] = content.get("status")
        elif event.sender == BOT and str(content.get("body", "")).startswith(NOT_BRIDGED):
            notices += 1
    return [e for e in portal.set_aside if statuses.get(e) != "FAIL_PERMANENT"], notices


async def fail(soak: Soak, what: str) -> None:
    raise AssertionError(f"{what}\nthe bridge's tasks:\n{await soak.stack.task_dump()}")


def catch_up(soak: Soak) -> tuple[float, float] | None:
    """The worst (first, last) arrival on the native side, after a bridge restart, of what the
    Matrix user sent while the bridge was down; seconds from the bridge being ready."""
    worst: tuple[float, float] | None = None
    for killed, ready in soak.restarts:
        arrivals = [
            portal.arrived_at[body] - ready
            for portal in soak.portals
            for body, acked in portal.matrix_acked_at.items()
            if killed <= acked <= ready and body in portal.arrived_at
        ]
        if arrivals:
            first, last = max(0.0, min(arrivals)), max(0.0, max(arrivals))
            worst = (first, last) if worst is None else (max(worst[0], first), max(worst[1], last))
    return worst


# --- the soak ----------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_soak(stack: BridgeStack) -> None:
    database = "postgres" if stack.database_url.startswith("postgresql") else "sqlite"
    natives = [await native_member(stack) for _ in range(PORTALS)]
    async with matrix_user(stack) as alice:
        portals = []
        for index, native in enumerate(natives):
            encrypted = index == PORTALS - 1
            make = encrypted_portal if encrypted else portal_with_native
            room_hex, room_id = await make(alice, native, f"soak {index}")
            room = bytes.fromhex(room_hex)
            portals.append(Portal(index, room, room_id, native, ghost_of(native), encrypted))
        soak = Soak(stack, alice, portals)
        if alice.should_query_keys:
            await alice.keys_query()

        async with syncing(alice):
            tasks = [asyncio.create_task(native_receiver(p)) for p in portals]
            senders = [
                asyncio.create_task(sender(soak, p))
                for p in portals
                for sender in (matrix_sender, native_sender)
            ]
            try:
                started, round_ = time.monotonic(), 0
                cycle = faults(database)
                while time.monotonic() - started < SECONDS:
                    await asyncio.sleep(min(FAULT_EVERY, SECONDS - (time.monotonic() - started)))
                    if time.monotonic() - started >= SECONDS:
                        break
                    fault = cycle[round_ % len(cycle)]
                    await fault(soak)
                    soak.faults[fault.__name__] += 1
                    for injector in INJECTORS:
                        await injector(soak, portals[round_ % len(portals)])
                    round_ += 1
                for task in senders:
                    if task.done():
                        task.result()  # a sender that failed fails the soak
                soak.stop.set()
                async with asyncio.timeout(WITHIN):
                    await asyncio.gather(*senders)
                quiet = await quiet_restart(soak)
                # The final message each way of every portal: no queue is stuck.
                async with asyncio.timeout(WITHIN):
                    await asyncio.gather(
                        *(
                            sender(soak, p, final=True)
                            for p in portals
                            for sender in (matrix_sender, native_sender)
                        )
                    )
                drained = time.monotonic()
                try:
                    async with asyncio.timeout(WITHIN):
                        while await differences(soak):  # noqa: ASYNC110 - other processes
                            await asyncio.sleep(1.0)
                except TimeoutError:
                    pass
                drain = time.monotonic() - drained
                # No quiet spell: the final messages are markers. Each side's came after
                # everything sent before it (the portals' queues keep the order), so once they
                # are in, a duplicate of anything before them is in too. (A message bridged
                # late for a lost room key is outside that order: it counts once it is in.)
                found = await differences(soak)
            finally:
                for task in [*tasks, *senders]:
                    task.cancel()
                await asyncio.gather(*tasks, *senders, return_exceptions=True)

            reports = [(p, *(await set_aside_reports(soak, p))) for p in portals]
        sent = sum(len(p.matrix_sent) + len(p.native_sent) for p in portals)
        bridged = 0
        for portal in portals:
            bridged += len(native_items(portal)) + len(await ghost_items(alice, portal))
        aside = sum(len(p.set_aside) for p in portals)
        late = sum(len(bridged_late(soak, p)) for p in portals)
        worst = catch_up(soak)
        print(
            f"\nsoak on {database}: {SECONDS:.0f} s of traffic in {PORTALS} portals "
            f"(one encrypted); faults {dict(soak.faults)}\n"
            f"messages and reactions sent {sent}, bridged {bridged}, set aside {aside}, "
            f"bridged late for a lost room key {late}; "
            f"images to Kalandra {sum(p.images for p in portals)}; oversized native texts "
            f"(split) {sum(p.oversized for p in portals)}; backlog drained in "
            f"{drain:.1f} s after the traffic\n"
            "worst catch-up after a bridge restart (ready -> first/last missed message): "
            + (f"{worst[0]:.1f} s / {worst[1]:.1f} s" if worst else "no message was missed")
            + f"\nkilled with no traffic: {quiet}"
        )
        if found:
            await fail(soak, "\n".join(found))
        for portal, unreported, notices in reports:
            if unreported or notices < len(portal.set_aside):
                await fail(
                    soak,
                    f"portal {portal.index}: bad items without their FAIL_PERMANENT status "
                    f"{unreported}; {notices} notices for {len(portal.set_aside)} items",
                )
    for native in natives:
        await native.close()
