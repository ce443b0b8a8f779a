"""The bot's own message (a relayed one) re-encrypted after STALE_EPOCH, then a crash, with a
real server and the bridge's own state store (SQLite and PostgreSQL).

The bridge saves the bot's room state only once its portal has mirrored what the group applied
(bridge/bot_state.py), so after a crash it may restore a state of the right epoch from before
the bot's last sends. Before the fix, a message the client core re-encrypted in a new epoch
(its first copy refused as STALE_EPOCH: a native member committed meanwhile) recorded no send
mark for that epoch, and the restarted bot's next message, sent before its catch-up came back,
used the same message key again: two frames with the same (epoch, leaf, generation) in the log,
the second one undecryptable for every member (a replayed generation), and a key reused for two
plaintexts.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest
from mautrix.util.async_db import Database
from nacl.signing import SigningKey

from bridge.bot_state import BotState
from bridge.db.client_state import ClientStateTable
from kalandra_core.client.content import Content
from kalandra_core.client.core import ClientCore
from kalandra_core.client.driver import Client, ServerAddress
from kalandra_core.client.state import ClientState
from kalandra_core.proto import EncryptedMessage, Frame, Opcode, decode_payload
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import ServerConfig
from kalandra_core.storage import migrations


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def _client(
    server: RunningServer, core: ClientCore, token: str, state: BotState | ClientState | None
) -> Client:
    assert server.tcp_port is not None
    return Client(
        core,
        ServerAddress("tcp", "127.0.0.1", server.tcp_port),
        token,
        state=state,  # type: ignore[arg-type]  # (BotState stands in for ClientState)
        reconnect=False,
        keepalive=None,
    )


async def _texts(client: Client, count: int) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(15):
        while len(out) < count:
            message = await client.messages.get()
            if message.sender_id != client.core.member_id:
                out.append(message.content.body)
    return out


@pytest.mark.asyncio
async def test_a_bot_message_re_encrypted_after_stale_epoch_is_never_keyed_twice_after_a_crash(
    db_url: str, tmp_path: Path
) -> None:
    await migrations.upgrade(db_url)
    server = await start_server(
        ServerConfig(database=db_url, tcp_port=0, quic_port=None, data_dir=tmp_path)
    )
    db = Database.create(db_url)
    await db.start()
    clients: list[Client] = []
    try:
        store = server.store
        bot_account, native_account = [await store.create_member(n) for n in ("bot", "native")]
        bot_token = await store.issue_token(bot_account.member_id)
        native_token = await store.issue_token(native_account.member_id)
        bot_key = bytes(SigningKey.generate())
        state_key = os.urandom(32)
        state = BotState(ClientStateTable(db, state_key, "bot"))
        state.start()
        bot = _client(server, ClientCore(bot_account.member_id, bot_key), bot_token, state)
        native = _client(
            server,
            ClientCore(native_account.member_id, bytes(SigningKey.generate())),
            native_token,
            None,
        )
        clients += [bot, native]
        await bot.connect()
        await native.connect()
        await native.publish_key_packages(1)
        room_id = await bot.create_room()
        await bot.invite(room_id, [native.core.member_id])
        await native.wait_for(lambda: room_id in native.core.rooms)
        await native.settle()
        await bot.send_text(room_id, "before")
        epoch = bot.core.rooms[room_id].epoch

        # The relayed message's first copy is held on its way until a native member's commit
        # is in: the server refuses it (STALE_EPOCH), the core re-encrypts it in the new epoch.
        held: list[bytes] = []
        send = bot._send

        def hold_first_message(data: bytes) -> None:
            if Frame.decode(data).header.opcode == Opcode.APP_MESSAGE and not held:
                held.append(data)
                return
            send(data)

        bot._send = hold_first_message  # type: ignore[method-assign]
        relayed = asyncio.create_task(bot.send_text(room_id, "relayed"))
        await bot.wait_for(lambda: bool(held))
        await native.self_update(room_id)
        await bot.wait_for(lambda: bot.core.rooms[room_id].epoch == epoch + 1)
        await state.flush()  # the room state of the new epoch, before any send in it
        # From here the portal lags (a slow Synapse): the room's snapshots wait, as bot_state.py
        # keeps them until the portal has mirrored what the group applied.
        state.message_routed(room_id)
        send(held[0])
        await asyncio.wait_for(relayed, 15)
        await state.flush()  # (what is written is written; the room snapshots stay parked)

        # The crash: the bot's state as the database has it.
        bot._closing = True
        assert bot._sink is not None
        bot._sink.close("crash")
        clients.remove(bot)
        core = ClientCore(bot_account.member_id, bot_key)
        await ClientStateTable(db, state_key, "bot").load_into(core)
        assert core.rooms[room_id].epoch == epoch + 1  # saved before the relayed message
        again_state = BotState(ClientStateTable(db, state_key, "bot"))
        again_state.start()
        again = _client(server, core, bot_token, again_state)
        clients.append(again)
        await again.connect()
        # At once, before the catch-up's answer: a message in the same epoch.
        await again.send_text(room_id, "after the crash")
        await again.settle()

        frames = await store.load_frames(room_id, 0, 1000)
        keyed = []
        for stored in frames:
            if stored.opcode == Opcode.APP_MESSAGE and stored.payload is not None:
                envelope = decode_payload(Opcode.APP_MESSAGE, stored.payload)
                assert isinstance(envelope, EncryptedMessage)
                keyed.append((envelope.epoch, envelope.sender_index, envelope.generation))
        assert len(keyed) == 3, keyed
        assert [k for k, n in Counter(keyed).items() if n > 1] == [], keyed
        # The native member reads each once (a reused generation would be refused as a replay).
        assert await _texts(native, 3) == ["before", "relayed", "after the crash"]
        await again_state.stop()
        await state.stop()
    finally:
        for client in clients:
            await client.close()
        await db.stop()
        await server.close()


@pytest.mark.asyncio
async def test_a_message_sent_again_under_its_request_id_is_the_first_one(
    sqlite_url: str, tmp_path: Path
) -> None:
    """What the bridge relies on for a relayed message replayed after a crash (bridge/
    members/bot_send.py): sent again under the request id it was recorded with, the message is not
    sequenced twice, and the sender gets the first one's log index, even when its log already
    holds it."""
    await migrations.upgrade(sqlite_url)
    server = await start_server(
        ServerConfig(database=sqlite_url, tcp_port=0, quic_port=None, data_dir=tmp_path)
    )
    try:
        account = await server.store.create_member("sender")
        token = await server.store.issue_token(account.member_id)
        client = _client(
            server, ClientCore(account.member_id, bytes(SigningKey.generate())), token, None
        )
        await client.connect()
        room_id = await client.create_room()
        request_id = client.core.next_request_id()
        first = await client.send(room_id, Content("once"), request_id=request_id)
        await client.settle()
        assert client.core.rooms[room_id].last_seen == first
        again = await asyncio.wait_for(
            client.send(room_id, Content("once"), request_id=request_id), 10
        )
        assert again == first
        frames = await server.store.load_frames(room_id, 0, 100)
        assert [f.log_index for f in frames if f.opcode == Opcode.APP_MESSAGE] == [first]
        await client.close()
    finally:
        await server.close()
