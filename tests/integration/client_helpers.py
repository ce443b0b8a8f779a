"""A native client of a new account on an embedded server, for the integration modules."""

from __future__ import annotations

from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.server.app import RunningServer


async def make_client(server: RunningServer, name: str) -> Client:
    account = await server.store.create_member(name)
    token = await server.store.issue_token(account.member_id)
    assert server.tcp_port is not None
    client = Client(
        ClientCore(account.member_id, bytes(SigningKey.generate())),
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        token,
        reconnect=False,
    )
    await client.connect()
    await client.publish_key_packages(1)
    return client
