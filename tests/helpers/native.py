"""Native members on an embedded server: accounts, clients, waiting for what they receive.

Every wait has a timeout; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.events import Message
from kalandra_core.mls.update_tracker import UpdatePolicy
from kalandra_core.server.app import RunningServer

T = TypeVar("T")
E = TypeVar("E")

TIMEOUT = 15.0  # a single wait on the embedded server (generous for a loaded 2-core machine)
WITHIN = 60.0  # a wait for what crosses the bridge (Synapse and the bridge on 2 busy cores)


def within(aw: Awaitable[T], timeout: float = TIMEOUT) -> Awaitable[T]:
    return asyncio.wait_for(aw, timeout)


@dataclass
class Account:
    member_id: int
    token: str
    key: SigningKey = field(default_factory=SigningKey.generate)


async def account(server: RunningServer, name: str) -> Account:
    """A new account on the server, with a login token and a signing key of its own."""
    member = await server.store.create_member(name)
    return Account(member.member_id, await server.store.issue_token(member.member_id))


async def make_client(
    server: RunningServer,
    name: str,
    *,
    core: type[ClientCore] = ClientCore,
    policy: UpdatePolicy = UpdatePolicy.STANDARD,
    key_packages: int = 1,
) -> Client:
    """A connected client of a new account over TCP (no reconnects), with ``key_packages``
    published; ``core``: ClientCore or a subclass (ExtendedCore), ``policy``: its self-update
    policy."""
    who = await account(server, name)
    assert server.tcp_port is not None
    client = Client(
        core(who.member_id, bytes(who.key), update_policy=policy),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        who.token,
        reconnect=False,
    )
    await client.connect()
    if key_packages:
        await client.publish_key_packages(key_packages)
    return client


def anything(_: object) -> bool:
    return True


async def next_event(
    client: Client, kind: type[E], match: Callable[[E], bool] = anything, within: float = WITHIN
) -> E:
    """The client's next event of ``kind`` that ``match`` accepts; others are dropped."""
    async with asyncio.timeout(within):
        while True:
            event = await client.events.get()
            if isinstance(event, kind) and match(event):
                return event


async def next_message(
    client: Client, match: Callable[[Message], bool] = anything, within: float = WITHIN
) -> Message:
    """The client's next message that ``match`` accepts (its own included); others are
    dropped."""
    async with asyncio.timeout(within):
        while True:
            message = await client.messages.get()
            if match(message):
                return message


async def next_from_others(
    client: Client, body: str | None = None, within: float = WITHIN
) -> Message:
    """The next message from another member (with ``body``, when given): a member's own
    messages come back from the log too."""
    mine = client.core.member_id
    return await next_message(
        client, lambda m: m.sender_id != mine and body in (None, m.content.body), within
    )
