"""Uploading and downloading media through a connected :class:`Client` (the I/O half of
:mod:`kalandra_core.media`).

Blocks go out a few at a time (``IN_FLIGHT``), each counted in the connection's send window
while it is in flight, so messages queued meanwhile share the same budget and a large file never
floods the connection; a RATE_LIMITED pause holds blocks back like any other request. A file
object is read block by block: neither side ever holds a whole large file for the transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO, Final, Protocol

from ..media.blob import (
    BLOCK_SIZE,
    MAX_BLOCK,
    BlobDecryptor,
    BlobEncryptor,
    EncryptedBlock,
    MediaError,
    MediaRef,
)
from ..proto import Frame, Opcode, Payload, PayloadDecodeError
from ..proto.payloads import CasBlock, CasHashes, decode_payload
from .core import ClientCore

IN_FLIGHT: Final = 24  # blocks per transfer (6 MiB): the default send window's bytes
ENCRYPT_HOP: Final = 4  # blocks read and encrypted per trip to a worker thread


class MediaClient(Protocol):
    """What a transfer needs of the client's driver (:class:`~.driver.Client` is one)."""

    core: ClientCore
    clock: Callable[[], float]
    request_timeout: float

    @property
    def closing(self) -> bool: ...

    async def window_changed(self) -> None: ...

    async def request_in_window(self, request_id: int, data: bytes, cost: int) -> Frame: ...


def _size_of(source: bytes | BinaryIO) -> int:
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source)
    here = source.tell()
    end = source.seek(0, os.SEEK_END)
    source.seek(here)
    return end - here


class _Transfer:
    """Requests of one transfer: at most IN_FLIGHT at a time, each admitted by the window."""

    def __init__(self, client: MediaClient, room_id: bytes) -> None:
        self.client = client
        self.room_int = int.from_bytes(room_id, "big")
        self.slots = asyncio.Semaphore(IN_FLIGHT)

    async def request(self, opcode: Opcode, payload: Payload, *, expect: int = 0) -> Frame:
        """Send one CAS request and return the answer; ``expect``: the size of the answer
        (a block being fetched), counted in the window as the request's own size is."""
        client = self.client
        core = client.core
        async with self.slots:
            rid, data = core.build_frame(
                opcode, payload, room_int=self.room_int, now=client.clock()
            )
            cost = max(len(data), expect)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + client.request_timeout
            while not core.reserve(cost, now=client.clock()):
                if client.closing:
                    raise MediaError("client closed during a media transfer")
                if not core.connected and loop.time() > deadline:
                    raise MediaError("not connected to the server")
                # Connected: until an answer or the end of a pause; else: until a reconnect.
                wait = None if core.connected else deadline - loop.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await client.window_changed()
            return await client.request_in_window(rid, data, cost)


def _decode(frame: Frame, kind: type[CasBlock] | type[CasHashes]) -> CasBlock | CasHashes:
    try:
        payload = decode_payload(frame.header.opcode, frame.payload)
    except PayloadDecodeError as exc:
        raise MediaError(f"unreadable answer from the server ({exc})") from None
    if not isinstance(payload, kind):
        raise MediaError("unexpected answer from the server")
    return payload


async def upload(
    client: MediaClient,
    room_id: bytes,
    source: bytes | BinaryIO,
    *,
    mimetype: str = "application/octet-stream",
    name: str = "",
    kind: str = "file",
    width: int | None = None,
    height: int | None = None,
    duration_ms: int | None = None,
    key: bytes | None = None,
) -> MediaRef:
    """Encrypt and store ``source`` (bytes, or a binary file read from its position to the
    end) in the room; returns the reference to send in a message. With the ``key`` of an
    interrupted upload of the same content, blocks the room already holds are not sent again."""
    size = _size_of(source)
    transfer = _Transfer(client, room_id)
    encryptor = BlobEncryptor(key)
    ahead = asyncio.Semaphore(IN_FLIGHT)  # blocks read and not yet stored
    held: set[bytes] = set()
    loop = asyncio.get_running_loop()

    def read_and_encrypt(offset: int, count: int) -> tuple[int, list[EncryptedBlock]]:
        # In a thread, ``count`` blocks in order (the encryptor's state): reading, hashing and
        # the cipher let go of the GIL, so the event loop meanwhile sends the blocks before
        # them and takes the answers. Several blocks per hop: a hop to the thread and back
        # costs about what encrypting a block does.
        blocks: list[EncryptedBlock] = []
        start = offset
        for _ in range(count):  # count never runs past the end: see the caller
            if isinstance(source, bytes | bytearray | memoryview):
                plain = bytes(source[offset : offset + BLOCK_SIZE])
            else:
                plain = source.read(min(BLOCK_SIZE, size - offset))
                if not plain:
                    raise MediaError("file ended before its size")
            offset += len(plain)
            blocks.append(encryptor.block(plain))
        return offset - start, blocks

    async def put(block: EncryptedBlock) -> None:
        try:
            if block.hash not in held:
                put = CasBlock(hash=block.hash, data=block.data, blob_size=size)
                await transfer.request(Opcode.CAS_PUT, put)
        finally:
            ahead.release()

    try:
        async with asyncio.TaskGroup() as tasks:
            batch: list[EncryptedBlock] = []
            offset = 0
            while offset < size:
                count = min(ENCRYPT_HOP, -(-(size - offset) // BLOCK_SIZE))  # blocks left
                for _ in range(count):
                    await ahead.acquire()
                length, blocks = await loop.run_in_executor(None, read_and_encrypt, offset, count)
                offset += length
                batch.extend(blocks)
                if key is not None and len(batch) < IN_FLIGHT and offset < size:
                    continue
                if key is not None:  # resuming: send only what the room lacks
                    answer = await transfer.request(
                        Opcode.CAS_PROOF, CasHashes(hashes=[b.hash for b in batch])
                    )
                    proof = _decode(answer, CasHashes)
                    assert isinstance(proof, CasHashes)
                    held.update(proof.hashes)
                for block in batch:
                    tasks.create_task(put(block))
                batch = []
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    await ahead.acquire()
    manifest = encryptor.finish()
    await put(manifest)
    return MediaRef(
        manifest=manifest.hash,
        key=encryptor.key,
        size=size,
        mimetype=mimetype,
        name=name,
        kind=kind,
        width=width,
        height=height,
        duration_ms=duration_ms,
    )


async def _get(transfer: _Transfer, digest: bytes) -> bytes:
    answer = await transfer.request(Opcode.CAS_GET, CasBlock(hash=digest), expect=MAX_BLOCK)
    block = _decode(answer, CasBlock)
    assert isinstance(block, CasBlock)
    if block.hash != digest or block.data is None:
        raise MediaError("the server answered with another block")
    return block.data


async def stream(client: MediaClient, room_id: bytes, ref: MediaRef) -> AsyncIterator[bytes]:
    """The plaintext of ``ref``, block by block in order, each checked (hash and AEAD) before
    it is yielded; the whole content is checked against the manifest at the end. Raises
    MediaError on any mismatch, ClientError when the server refuses."""
    transfer = _Transfer(client, room_id)
    decryptor = BlobDecryptor(ref)
    manifest = decryptor.open_manifest(await _get(transfer, ref.manifest))
    pending: list[asyncio.Task[bytes]] = []
    try:
        for digest in manifest.blocks:
            pending.append(asyncio.create_task(_get(transfer, digest)))
            if len(pending) < IN_FLIGHT:
                continue
            yield decryptor.block(await pending.pop(0))
        while pending:
            yield decryptor.block(await pending.pop(0))
        decryptor.finish()
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def download(client: MediaClient, room_id: bytes, ref: MediaRef) -> bytes:
    parts = [part async for part in stream(client, room_id, ref)]
    return b"".join(parts)


async def missing(client: MediaClient, room_id: bytes, hashes: list[bytes]) -> list[bytes]:
    """Which of ``hashes`` the room does not hold yet (CASProof)."""
    answer = await _Transfer(client, room_id).request(Opcode.CAS_PROOF, CasHashes(hashes=hashes))
    proof = _decode(answer, CasHashes)
    assert isinstance(proof, CasHashes)
    held = set(proof.hashes)
    return [h for h in hashes if h not in held]


async def delete(client: MediaClient, room_id: bytes, ref: MediaRef) -> int:
    """Drop the room's references to the blocks of ``ref`` (ours; a moderator's: everyone's);
    returns how many blocks lost a reference."""
    transfer = _Transfer(client, room_id)
    decryptor = BlobDecryptor(ref)
    manifest = decryptor.open_manifest(await _get(transfer, ref.manifest))
    hashes = [*manifest.blocks, ref.manifest]
    dropped = 0
    for start in range(0, len(hashes), 1024):
        answer = await transfer.request(
            Opcode.CAS_DELETE, CasHashes(hashes=hashes[start : start + 1024])
        )
        result = _decode(answer, CasHashes)
        assert isinstance(result, CasHashes)
        dropped += len(result.hashes)
    return dropped
