"""Media between native clients through a real server over TCP, on SQLite and PostgreSQL: files
round-trip byte for byte, the server's tables hold only ciphertext, its refusals are Error
frames with the right code, blocks are kept once and released, and a tampered block makes the
download fail."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers.native import make_client
from sqlalchemy.ext.asyncio import create_async_engine

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client, ClientError
from kalandra_core.client.media import IN_FLIGHT, _Transfer, missing
from kalandra_core.media import BLOCK_SIZE, MAX_BLOCK, BlobEncryptor, MediaError, block_hash
from kalandra_core.proto import ErrorCode, Opcode
from kalandra_core.proto.payloads import CasBlock, CasHashes
from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import MediaConfig, ServerConfig
from kalandra_core.storage import schema as db
from kalandra_core.storage.urls import sqlalchemy_url

WITHIN = 30.0
MAX_SIZE = 8 * 1024 * 1024


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def server(db_url: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(
        ServerConfig(
            database=db_url,
            tcp_port=0,
            quic_port=None,
            data_dir=tmp_path,
            media=MediaConfig(max_size=MAX_SIZE),
        )
    )
    try:
        yield running
    finally:
        await running.close()


async def room_of_two(server: RunningServer) -> tuple[Client, Client, bytes]:
    a, b = await make_client(server, "alice"), await make_client(server, "bob")
    room = await a.create_room()
    await a.invite(room, [b.core.member_id])
    await b.wait_for(lambda: room in b.core.rooms)
    await b.settle()
    return a, b, room


async def stored_blocks(url: str) -> list[bytes]:
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(db.media_blocks.c.data))).all()
    finally:
        await engine.dispose()
    return [bytes(r[0]) for r in rows]


async def refused(client: Client, room: bytes, opcode: Opcode, payload: object) -> int:
    with pytest.raises(ClientError) as caught:
        await _Transfer(client, room).request(opcode, payload)  # type: ignore[arg-type]
    return caught.value.code


async def test_files_round_trip_and_the_server_holds_only_ciphertext(
    server: RunningServer, db_url: str
) -> None:
    a, b, room = await room_of_two(server)
    small = os.urandom(1024 * 1024)
    large = os.urandom(3 * 1024 * 1024 + 300 * 1024)  # 14 blocks, the last one short
    sent = {}
    for name, data, kind in (("one.bin", small, "file"), ("big.png", large, "image")):
        ref = await a.upload_media(room, data, mimetype="image/png", name=name, kind=kind)
        index = await a.send(room, Content(body=name, kind=kind, media=ref))
        sent[index] = data
    got: dict[int, Content] = {}
    async with asyncio.timeout(WITHIN):
        while len(got) < 2:
            message = await b.messages.get()
            if message.content.media is not None:
                got[message.log_index] = message.content
    for index, content in got.items():
        assert content.media is not None
        assert content.kind in ("file", "image")
        data = await b.download_media(room, content.media)
        assert data == sent[index]
        assert content.media.size == len(data)
        assert content.media.name == content.body
    # What the server stored: encrypted blocks, none containing any piece of the files.
    blocks = await stored_blocks(db_url)
    assert len(blocks) == 4 + 1 + 14 + 1  # blocks and a manifest per file
    assert all(len(block) <= MAX_BLOCK for block in blocks)
    for data in (small, large):
        for start in range(0, len(data), BLOCK_SIZE):
            probe = data[start : start + 64]
            assert not any(probe in block for block in blocks)
    for client in (a, b):
        await client.close()


async def test_refusals_are_error_frames(server: RunningServer) -> None:
    a, b, room = await room_of_two(server)
    eve = await make_client(server, "eve")
    block = BlobEncryptor().block(b"x" * 1000)
    good = CasBlock(hash=block.hash, data=block.data, blob_size=1000)
    # Hash mismatch, oversize block, oversize blob.
    wrong = CasBlock(hash=block_hash(b"other"), data=block.data, blob_size=1000)
    assert await refused(a, room, Opcode.CAS_PUT, wrong) == ErrorCode.INVALID_PAYLOAD
    huge = os.urandom(MAX_BLOCK + 1)
    oversize = CasBlock(hash=block_hash(huge), data=huge, blob_size=len(huge))
    assert await refused(a, room, Opcode.CAS_PUT, oversize) == ErrorCode.QUOTA_EXCEEDED
    too_big = CasBlock(hash=block.hash, data=block.data, blob_size=MAX_SIZE + 1)
    assert await refused(a, room, Opcode.CAS_PUT, too_big) == ErrorCode.QUOTA_EXCEEDED
    with pytest.raises(ClientError) as caught:
        await a.upload_media(room, os.urandom(MAX_SIZE + 1))
    assert caught.value.code == ErrorCode.QUOTA_EXCEEDED
    assert "up to 8388608 bytes" in str(caught.value)
    # A member's block is not reachable by someone outside the room, either way.
    await _Transfer(a, room).request(Opcode.CAS_PUT, good)
    for opcode, payload in (
        (Opcode.CAS_PUT, good),
        (Opcode.CAS_GET, CasBlock(hash=block.hash)),
        (Opcode.CAS_PROOF, CasHashes(hashes=[block.hash])),
        (Opcode.CAS_DELETE, CasHashes(hashes=[block.hash])),
    ):
        assert await refused(eve, room, opcode, payload) == ErrorCode.NOT_AUTHORIZED
    eve_room = await eve.create_room()
    # Another room of the same server does not reach it either.
    get = CasBlock(hash=block.hash)
    assert await refused(eve, eve_room, Opcode.CAS_GET, get) == ErrorCode.MESSAGE_NOT_FOUND
    assert await server.store.media_refcount(block.hash) == 1
    for client in (a, b, eve):
        await client.close()


async def test_dedup_resume_and_delete(server: RunningServer, db_url: str) -> None:
    a, b, room = await room_of_two(server)
    data = os.urandom(2 * BLOCK_SIZE + 5)
    ref = await a.upload_media(room, data, name="f")
    encryptor = BlobEncryptor(ref.key)
    hashes = [
        encryptor.block(data[i : i + BLOCK_SIZE]).hash for i in range(0, len(data), BLOCK_SIZE)
    ]
    hashes.append(encryptor.finish().hash)
    assert hashes[-1] == ref.manifest
    # CASProof: the room holds every block of the file, and not a block it never got.
    unknown = block_hash(b"never stored")
    assert await missing(b, room, [*hashes, unknown]) == [unknown]
    # An upload resumed with the same key gives the same blocks and stores nothing twice.
    again = await a.upload_media(room, data, name="f", key=ref.key)
    assert again.manifest == ref.manifest
    assert [await server.store.media_refcount(h) for h in hashes] == [1, 1, 1, 1]
    # Bob stores one of the same blocks: kept once, referenced twice.
    stored = await server.store.media_get(room, hashes[0])
    put = CasBlock(hash=hashes[0], data=stored, blob_size=len(data))
    await _Transfer(b, room).request(Opcode.CAS_PUT, put)
    assert await server.store.media_refcount(hashes[0]) == 2
    assert len(await stored_blocks(db_url)) == 4
    # Bob (a member) drops only his own references; the block stays for Alice's.
    assert await b.delete_media(room, ref) == 1
    assert await server.store.media_refcount(hashes[0]) == 1
    assert await b.download_media(room, ref) == data
    # Alice (the owner) drops every reference: the blocks are gone.
    assert await a.delete_media(room, ref) == 4
    assert [await server.store.media_refcount(h) for h in hashes] == [0, 0, 0, 0]
    assert await stored_blocks(db_url) == []
    get = CasBlock(hash=ref.manifest)
    assert await refused(b, room, Opcode.CAS_GET, get) == ErrorCode.MESSAGE_NOT_FOUND
    for client in (a, b):
        await client.close()


async def test_a_tampered_block_fails_the_download(server: RunningServer, db_url: str) -> None:
    a, b, room = await room_of_two(server)
    data = os.urandom(BLOCK_SIZE + 100)
    ref = await a.upload_media(room, data, name="t")
    assert await b.download_media(room, ref) == data
    engine = create_async_engine(sqlalchemy_url(db_url))
    try:
        async with engine.begin() as conn:
            rows = (await conn.execute(sa.select(db.media_blocks.c.digest))).all()
            victim = next(bytes(r[0]) for r in rows if bytes(r[0]) != ref.manifest)
            stored = await conn.scalar(
                sa.select(db.media_blocks.c.data).where(db.media_blocks.c.digest == victim)
            )
            assert stored is not None
            flipped = bytes([stored[0] ^ 1]) + bytes(stored[1:])
            await conn.execute(
                db.media_blocks.update()
                .where(db.media_blocks.c.digest == victim)
                .values(data=flipped)
            )
    finally:
        await engine.dispose()
    with pytest.raises(MediaError, match="does not match its hash"):
        await b.download_media(room, ref)
    for client in (a, b):
        await client.close()


async def test_a_block_refused_mid_window_stores_nothing_and_the_upload_resumes(
    db_url: str, tmp_path: Path
) -> None:
    """A whole window of blocks is in flight when one is refused (over the quota): the upload
    fails with that Error, the refused blocks are not stored, those before them are, and the
    same upload with the same key later sends only what the room lacks."""
    blocks = 12
    assert blocks <= IN_FLIGHT  # every block of the file goes out before the first answer
    config = ServerConfig(
        database=db_url,
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        media=MediaConfig(max_size=MAX_SIZE, quota_per_member=5 * MAX_BLOCK),
    )
    server = await start_server(config)
    try:
        a, b, room = await room_of_two(server)
        data, key = os.urandom(blocks * BLOCK_SIZE), os.urandom(32)
        encryptor = BlobEncryptor(key)
        hashes = [
            encryptor.block(data[i : i + BLOCK_SIZE]).hash for i in range(0, len(data), BLOCK_SIZE)
        ]
        with pytest.raises(ClientError) as caught:
            await a.upload_media(room, data, key=key)
        assert caught.value.code == ErrorCode.QUOTA_EXCEEDED
        await a.settle()
        assert await server.store.media_present(room, hashes) == hashes[:5]
        assert await server.store.media_usage(a.core.member_id) == 5 * MAX_BLOCK
        server.hub.config.media.quota_per_member = 0  # the member made room
        ref = await a.upload_media(room, data, key=key)
        assert await server.store.media_present(room, hashes) == hashes
        assert [await server.store.media_refcount(h) for h in hashes] == [1] * blocks
        assert await b.download_media(room, ref) == data
        for client in (a, b):
            await client.close()
    finally:
        await server.close()
