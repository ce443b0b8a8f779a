"""The committed fuzz corpus (tests/security/corpus/, written by make_corpus.py) through every
parser a peer's bytes reach: the header parser, the stream decoder, the frame decoder, every
payload decoder and the MLS inspectors the server runs on handshakes.

Only typed errors (ProtocolError, InvalidMlsMessage) may come out, memory stays far below
what the hostile entries declare, and nothing hangs; hypothesis then mutates the corpus
(byte flips, splices, truncations) on a fixed, derandomized profile. Last, corpus entries go
to a live server: each is answered with frames or a clean disconnect, and the server goes on
serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalandra_core.mls._lib import crypto_for_suite
from kalandra_core.mls.errors import InvalidMlsMessage
from kalandra_core.mls.keypackage import parse_key_package
from kalandra_core.mls.server_view import inspect_group_info, inspect_handshake
from kalandra_core.proto import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameHeader,
    Hello,
    Opcode,
    ProtocolError,
    decode_payload,
)
from kalandra_core.server.app import RunningServer
from security.hostile import TIMEOUT, account, client, db_path, snapshot, still_serving

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(CORPUS.glob("*.bin"))
SEEDS = [f.read_bytes() for f in FILES]
# Every opcode with a payload type, and numbers that have none.
OPCODES = [*Opcode, 0x0000, 0x00FE, 0xFFFF]
# Peak traced memory while one entry is parsed: far below the 16 MiB .. 2^63 bytes that the
# hostile entries declare, so nothing was allocated from a claimed length.
MEMORY_BOUND = 4 * 1024 * 1024
HANG = 30.0  # seconds: only a hang gets anywhere near this


def typed(call: Callable[[], object]) -> None:
    with contextlib.suppress(ProtocolError, InvalidMlsMessage):
        call()


def chunked(data: bytes, size: int) -> None:
    decoder = FrameDecoder()
    try:
        for start in range(0, max(len(data), 1), size):
            for frame in decoder.feed(data[start : start + size]):
                parse_payloads(frame.header.opcode, frame.payload)
            assert decoder.buffered <= decoder.max_buffered
        decoder.eof()
    except ProtocolError:
        pass


def parse_payloads(opcode: int, payload: bytes) -> None:
    typed(lambda: decode_payload(opcode, payload))


def exercise(data: bytes) -> None:
    """Every parser on ``data`` (a stream) and on its payload part."""
    typed(lambda: FrameHeader.parse(data))
    typed(lambda: Frame.decode(data))
    for size in (len(data) or 1, 1, 7, 128, 4096):
        chunked(data, size)
    for body in {data, data[HEADER_SIZE:]}:
        for opcode in OPCODES:
            typed(lambda op=opcode, b=body: decode_payload(op, b))  # type: ignore[misc]
        typed(lambda b=body: inspect_handshake(b))  # type: ignore[misc]
        typed(lambda b=body: inspect_group_info(b))  # type: ignore[misc]
        for suite in (1, 3):
            typed(lambda b=body, s=suite: parse_key_package(b, crypto_for_suite(s)))  # type: ignore[misc]


def bounded(data: bytes) -> int:
    """Run :func:`exercise` in a thread (a hang fails instead of blocking the suite); return
    its peak traced memory. Any untyped exception is re-raised here."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            exercise(data)
        except BaseException as exc:
            failure.append(exc)

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(HANG)
        assert not worker.is_alive(), "parsing hung"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if failure:
        raise failure[0]
    return peak


def test_the_corpus_covers_every_kind() -> None:
    kinds = {f.stem.split("-")[0] for f in FILES}
    assert {"vector", "mls", "truncated", "wrong", "cbor", "type", "payload"} <= kinds
    assert len(FILES) >= 80


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_corpus_entry_gives_typed_errors_in_bounded_memory(path: Path) -> None:
    data = path.read_bytes()
    peak = bounded(data)
    assert peak < MEMORY_BOUND, f"{path.name}: {peak} bytes traced"


def mutate(data: bytes, other: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in ops:
        at = pos % (len(out) + 1)
        if kind == 0 and out:  # flip one bit
            out[at % len(out)] ^= 1 << (value % 8)
        elif kind == 1:  # splice in part of another entry
            out[at:at] = other[value % (len(other) + 1) :][:64]
        elif kind == 2:  # truncate
            del out[at:]
        elif kind == 3:  # overwrite a header field with an extreme value
            if len(out) >= 16:
                struct.pack_into(">I", out, 12, (value * 0x01010101) & 0xFFFFFFFF)
        else:  # insert a byte
            out.insert(at, value & 0xFF)
    return bytes(out)


@settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.sampled_from(SEEDS),
    st.sampled_from(SEEDS),
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 2**16), st.integers(0, 2**16)),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_corpus_gives_typed_errors(
    seed: bytes, other: bytes, ops: list[tuple[int, int, int]]
) -> None:
    data = mutate(seed, other, ops)
    typed(lambda: FrameHeader.parse(data))
    chunked(data, 61)
    body = data[HEADER_SIZE:]
    # The opcode the (possibly broken) header names, read without validating the header.
    opcode = struct.unpack_from(">H", data, 6)[0] if len(data) >= 8 else Opcode.HELLO
    for op in {opcode, Opcode.HELLO, Opcode.APP_MESSAGE, Opcode.SYNC_RESPONSE, Opcode.COMMIT}:
        typed(lambda op=op: decode_payload(op, body))  # type: ignore[misc]
    typed(lambda: inspect_handshake(body))


async def send_and_hang_up(server: RunningServer, data: bytes, hello: bytes) -> list[Frame]:
    """Open a connection, send ``hello`` (may be empty) and ``data``, half-close, and read what
    the server answers until it closes the connection. Fails if it never does."""
    assert server.tcp_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.tcp_port)
    try:
        writer.write(hello + data)
        await writer.drain()
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
    finally:
        writer.close()
    decoder = FrameDecoder()
    frames = decoder.feed(received)
    decoder.eof()  # whole frames only: the server never sends a broken one
    return frames


async def test_live_server_survives_the_corpus(server: RunningServer) -> None:
    alice = await account(server, "alice")
    hello = Frame.build(
        FrameHeader(Opcode.HELLO, request_id=1),
        Hello(auth_token=alice.token.encode(), signature_key=bytes(alice.key.verify_key)),
    ).encode()
    a = await client(server, alice)  # a member with a room, working throughout
    room_id = await a.create_room(name="bystander")
    index = await a.send_text(room_id, "before")
    path = db_path(server.hub.config.database)
    before = snapshot(path)
    try:
        for i, data in enumerate(SEEDS):
            # Half the entries from an authenticated session, to reach past the Hello gate.
            frames = await send_and_hang_up(server, data, hello if i % 2 else b"")
            for frame in frames:
                # Errors, or the plain answers a valid frame gets (HelloReply, Pong, Goodbye).
                assert frame.header.opcode in {
                    Opcode.ERROR,
                    Opcode.HELLO_REPLY,
                    Opcode.PONG,
                    Opcode.GOODBYE,
                }, (FILES[i].name, frame.header)
        # Nothing any entry carried was stored, and everyone else is still served.
        assert snapshot(path) == before
        await still_serving(server)
        assert await a.send_text(room_id, "after") == index + 1
    finally:
        await a.close()
