"""Media blobs without a server: encryption round trip, every integrity check, the payloads'
wire form, and media references inside message content."""

from __future__ import annotations

import os

import cbor2
import pytest

from kalandra_core.client.content import Content
from kalandra_core.media import (
    BLOCK_SIZE,
    BlobDecryptor,
    BlobEncryptor,
    EncryptedBlock,
    MediaError,
    MediaRef,
)
from kalandra_core.proto import Opcode
from kalandra_core.proto.payloads import CasBlock, CasHashes, decode_payload


def encrypt(data: bytes, key: bytes | None = None) -> tuple[MediaRef, list[EncryptedBlock]]:
    enc = BlobEncryptor(key)
    blocks = [enc.block(data[i : i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)]
    manifest = enc.finish()
    ref = MediaRef(manifest=manifest.hash, key=enc.key, size=len(data), kind="video")
    return ref, [manifest, *blocks]


def decrypt(ref: MediaRef, manifest: bytes, blocks: list[bytes]) -> bytes:
    dec = BlobDecryptor(ref)
    dec.open_manifest(manifest)
    out = b"".join(dec.block(b) for b in blocks)
    dec.finish()
    return out


@pytest.mark.parametrize("size", [0, 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE - 7])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    ref, (manifest, *blocks) = encrypt(data)
    assert len(blocks) == -(-size // BLOCK_SIZE)
    assert decrypt(ref, manifest.data, [b.data for b in blocks]) == data
    assert all(data[:32] not in b.data for b in blocks if size >= 32)


def test_same_key_same_blocks_and_fresh_keys_differ() -> None:
    data = os.urandom(BLOCK_SIZE + 10)
    ref, blocks = encrypt(data)
    _, blocks_again = encrypt(data, ref.key)
    assert [b.hash for b in blocks] == [b.hash for b in blocks_again]
    _, fresh = encrypt(data)
    assert not {b.hash for b in fresh} & {b.hash for b in blocks}


def test_every_mismatch_is_refused() -> None:
    data = os.urandom(2 * BLOCK_SIZE)
    ref, (manifest, first, second) = encrypt(data)
    dec = BlobDecryptor(ref)
    with pytest.raises(MediaError, match="manifest does not match"):
        dec.open_manifest(manifest.data[:-1] + bytes([manifest.data[-1] ^ 1]))
    wrong_key = MediaRef(manifest=ref.manifest, key=os.urandom(32), size=ref.size)
    with pytest.raises(MediaError, match="does not decrypt"):
        BlobDecryptor(wrong_key).open_manifest(manifest.data)
    lying = MediaRef(manifest=ref.manifest, key=ref.key, size=ref.size + 1)
    with pytest.raises(MediaError, match="size differs"):
        BlobDecryptor(lying).open_manifest(manifest.data)
    dec.open_manifest(manifest.data)
    with pytest.raises(MediaError, match="block 0 does not match"):
        dec.block(second.data)  # swapped order
    with pytest.raises(MediaError, match="block 0 does not match"):
        dec.block(first.data[:-1] + bytes([first.data[-1] ^ 1]))
    dec.block(first.data)
    with pytest.raises(MediaError, match="incomplete"):
        dec.finish()


def test_blocks_must_be_full_but_the_last() -> None:
    enc = BlobEncryptor()
    enc.block(b"short")
    with pytest.raises(MediaError):
        enc.block(b"more")
    with pytest.raises(MediaError):
        BlobEncryptor().block(b"")


def test_payloads_carry_blocks_as_byte_strings() -> None:
    put = CasBlock(hash=bytes(32), data=b"\xff" * 1000, blob_size=5)
    wire = put.encode()
    assert len(wire) < 1100  # a CBOR byte string, not an array of integers
    assert decode_payload(Opcode.CAS_PUT, wire) == put
    assert cbor2.loads(wire)["data"] == b"\xff" * 1000
    proof = CasHashes(hashes=[bytes(32), b"\x01" * 32])
    assert decode_payload(Opcode.CAS_PROOF, proof.encode()) == proof
    assert CasBlock.from_json(put.to_json()) == put


def test_content_carries_a_media_reference() -> None:
    ref = MediaRef(
        manifest=os.urandom(32),
        key=os.urandom(32),
        size=123,
        mimetype="image/png",
        name="cat.png",
        kind="image",
        width=640,
        height=480,
    )
    content = Content(body="cat.png", kind="image", media=ref)
    decoded = Content.decode(content.encode())
    assert decoded == content
    # What an older client makes of it: a text message with the file name as its body.
    raw = cbor2.loads(content.encode())
    assert (raw["type"], raw["body"]) == ("image", "cat.png")
    # A broken reference leaves the message readable by its body.
    raw["media"] = {"manifest": b"short"}
    broken = Content.decode(cbor2.dumps(raw))
    assert (broken.body, broken.media) == ("cat.png", None)
