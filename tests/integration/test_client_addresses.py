"""A client given several server addresses (the processes of a cluster): it connects to the
first that answers, and after losing its connection it tries another first. Real sockets: a
port nobody listens on stands for a dead process."""

from __future__ import annotations

import socket

import pytest
from helpers.native import account, next_event, within

from kalandra_core.client import events as ev
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress, addresses_text
from kalandra_core.server.app import RunningServer


def dead_port() -> int:
    """A port that refuses connections (bound, then closed at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_several_addresses_parse_and_print_back() -> None:
    text = "tcp://a.example:7000, quic://b.example:7001,c.example:7002"
    addresses = ServerAddress.parse_many(text)
    assert addresses == [
        ServerAddress("tcp", "a.example", 7000),
        ServerAddress("quic", "b.example", 7001),
        ServerAddress("tcp", "c.example", 7002),
    ]
    assert ServerAddress.parse_many(addresses_text(addresses)) == addresses
    for bad in ("", " , ", "tcp://a.example:7000,http://b.example:1"):
        with pytest.raises(ValueError, match="address"):
            ServerAddress.parse_many(bad)


async def test_a_dead_first_address_is_passed_over(server: RunningServer) -> None:
    assert server.tcp_port is not None
    who = await account(server, "alice")
    live = ServerAddress("tcp", "127.0.0.1", server.tcp_port)
    dead = ServerAddress("tcp", "127.0.0.1", dead_port())
    client = Client(ClientCore(who.member_id, bytes(who.key)), [dead, live], who.token)
    try:
        await within(client.connect())
        assert client.address == live
        assert await within(client.publish_key_packages(1)) == 1  # a working session
    finally:
        await client.close()


async def test_none_answering_raises_the_last_failure(server: RunningServer) -> None:
    who = await account(server, "bob")
    dead = [ServerAddress("tcp", "127.0.0.1", dead_port()) for _ in range(2)]
    client = Client(ClientCore(who.member_id, bytes(who.key)), dead, who.token, reconnect=False)
    try:
        with pytest.raises(ConnectionRefusedError):
            await within(client.connect())
    finally:
        await client.close()


async def test_a_lost_connection_tries_the_next_address_first(server: RunningServer) -> None:
    """Two addresses of the same server: the one in use drops the session (as a dying process
    would), and the client comes back through the other one."""
    assert server.tcp_port is not None
    who = await account(server, "carol")
    first = ServerAddress("tcp", "127.0.0.1", server.tcp_port)
    second = ServerAddress("tcp", "localhost", server.tcp_port)
    client = Client(ClientCore(who.member_id, bytes(who.key)), [first, second], who.token)
    try:
        await within(client.connect())
        assert client.address == first
        for session in list(server.hub.sessions.values()):
            session.close("going away")
        await next_event(client, ev.Reconnected)
        assert client.address == second
        assert await within(client.publish_key_packages(1)) == 1
    finally:
        await client.close()
