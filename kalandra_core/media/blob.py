"""Blocks, manifests and media references: the encryption and integrity rules of a blob.

Sans-IO: :class:`BlobEncryptor` turns plaintext blocks into encrypted blocks and finally the
encrypted manifest; :class:`BlobDecryptor` opens the manifest of a :class:`MediaRef` and then
checks and decrypts each block in order, and the whole plaintext at the end. Every failure is a
:class:`MediaError` that says what did not match (never the key or the content).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from blake3 import blake3

from .xchacha import AuthenticationError, XChaCha20Poly1305

BLOCK_SIZE: Final = 256 * 1024  # plaintext bytes per block (the last one may be shorter)
TAG_SIZE: Final = 16
MAX_BLOCK: Final = BLOCK_SIZE + TAG_SIZE  # an encrypted block on the wire and on disk
KEY_SIZE: Final = 32
HASH_SIZE: Final = 32
KINDS: Final = frozenset({"image", "file", "audio", "video", "sticker"})
MANIFEST_VERSION: Final = 1
_BLOCK_AD: Final = b"kalandra media block v1"
_MANIFEST_AD: Final = b"kalandra media manifest v1"
_MANIFEST_INDEX: Final = (1 << 64) - 1  # never a block index: blocks are counted from 0


class MediaError(Exception):
    """A blob could not be stored or read back intact."""


def block_hash(data: bytes) -> bytes:
    """The address of an encrypted block: BLAKE3-256 of its bytes."""
    return blake3(data).digest()


def _nonce(index: int) -> bytes:
    # 24 bytes: a fixed prefix and the block index. One key encrypts one blob, so
    # (key, nonce) pairs are unique as long as indexes are.
    return b"kmedia\x00\x00" + struct.pack(">QQ", 0, index)


def _ad(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">Q", index)


@dataclass(frozen=True, slots=True)
class EncryptedBlock:
    hash: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    block_size: int
    blocks: tuple[bytes, ...]
    plaintext_hash: bytes  # BLAKE3 of the whole plaintext

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "v": MANIFEST_VERSION,
                "size": self.size,
                "block_size": self.block_size,
                "blocks": list(self.blocks),
                "blake3": self.plaintext_hash,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            obj = cbor2.loads(data)
            if not isinstance(obj, dict) or obj.get("v") != MANIFEST_VERSION:
                raise ValueError("unknown manifest version")
            size, block_size, blocks = obj["size"], obj["block_size"], obj["blocks"]
            digest = obj["blake3"]
            if not (isinstance(size, int) and isinstance(block_size, int) and size >= 0):
                raise ValueError("bad sizes")
            if not 0 < block_size <= BLOCK_SIZE or not isinstance(blocks, list):
                raise ValueError("bad block list")
            if any(not isinstance(b, bytes) or len(b) != HASH_SIZE for b in blocks):
                raise ValueError("bad block hash")
            if len(blocks) != -(-size // block_size) or not isinstance(digest, bytes):
                raise ValueError("block count does not match the size")
        except (ValueError, KeyError, TypeError, cbor2.CBORDecodeError) as exc:
            raise MediaError(f"malformed media manifest ({exc})") from None
        return cls(size, block_size, tuple(blocks), digest)


@dataclass(frozen=True, slots=True)
class MediaRef:
    """What a message carries to share a file: where its manifest is and how to read it."""

    manifest: bytes  # hash of the encrypted manifest
    key: bytes
    size: int
    mimetype: str = "application/octet-stream"
    name: str = ""
    kind: str = "file"
    width: int | None = None
    height: int | None = None
    duration_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept

    def __post_init__(self) -> None:
        if len(self.manifest) != HASH_SIZE or len(self.key) != KEY_SIZE:
            raise MediaError("a media reference needs a 32-byte hash and a 32-byte key")
        if self.kind not in KINDS:
            raise MediaError(f"unknown media kind {self.kind!r}")

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest": self.manifest,
            "key": self.key,
            "size": self.size,
            "mimetype": self.mimetype,
            "name": self.name,
            "kind": self.kind,
        }
        for name in ("width", "height", "duration_ms"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_cbor(cls, obj: Mapping[Any, Any]) -> MediaRef:
        """Raises MediaError when a required field is missing or of the wrong type."""

        def opt_int(name: str) -> int | None:
            value = obj.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        manifest, key, size = obj.get("manifest"), obj.get("key"), obj.get("size")
        if not isinstance(manifest, bytes) or not isinstance(key, bytes):
            raise MediaError("media reference without manifest hash or key")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MediaError("media reference without a size")
        mimetype, name, kind = obj.get("mimetype"), obj.get("name"), obj.get("kind")
        known = {"manifest", "key", "size", "mimetype", "name", "kind"}
        known |= {"width", "height", "duration_ms"}
        return cls(
            manifest=manifest,
            key=key,
            size=size,
            mimetype=mimetype if isinstance(mimetype, str) else "application/octet-stream",
            name=name if isinstance(name, str) else "",
            kind=kind if isinstance(kind, str) and kind in KINDS else "file",
            width=opt_int("width"),
            height=opt_int("height"),
            duration_ms=opt_int("duration_ms"),
            extra={k: v for k, v in obj.items() if isinstance(k, str) and k not in known},
        )


class BlobEncryptor:
    """Feed the plaintext in blocks of BLOCK_SIZE (only the last may be shorter), then
    ``finish`` for the manifest. ``key`` given: the same key gives the same blocks (resuming
    an upload, see CASProof)."""

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise MediaError("a media key is 32 bytes")
        self.key = key if key is not None else os.urandom(KEY_SIZE)
        self._aead = XChaCha20Poly1305(self.key)
        self.size = 0
        self._hashes: list[bytes] = []
        self._plain = blake3()
        self._short = False

    def block(self, plaintext: bytes) -> EncryptedBlock:
        if not 0 < len(plaintext) <= BLOCK_SIZE or self._short:
            raise MediaError("blocks are full BLOCK_SIZE chunks but for the last one")
        self._short = len(plaintext) < BLOCK_SIZE
        index = len(self._hashes)
        data = self._aead.encrypt(_nonce(index), plaintext, _ad(_BLOCK_AD, index))
        digest = block_hash(data)
        self._hashes.append(digest)
        self._plain.update(plaintext)
        self.size += len(plaintext)
        return EncryptedBlock(digest, data)

    def finish(self) -> EncryptedBlock:
        manifest = Manifest(self.size, BLOCK_SIZE, tuple(self._hashes), self._plain.digest())
        plain = manifest.encode()
        if len(plain) > BLOCK_SIZE:
            raise MediaError("file too large for one manifest block")
        data = self._aead.encrypt(_nonce(_MANIFEST_INDEX), plain, _ad(_MANIFEST_AD, 0))
        return EncryptedBlock(block_hash(data), data)


class BlobDecryptor:
    """``manifest`` first (the encrypted manifest the ref names), then ``block`` for each of
    ``manifest.blocks`` in order, then ``finish``."""

    def __init__(self, ref: MediaRef) -> None:
        self.ref = ref
        self._aead = XChaCha20Poly1305(ref.key)
        self.manifest: Manifest | None = None
        self._next = 0
        self._plain = blake3()
        self._size = 0

    def open_manifest(self, data: bytes) -> Manifest:
        if block_hash(data) != self.ref.manifest:
            raise MediaError("media manifest does not match its hash (tampered or corrupt)")
        try:
            plain = self._aead.decrypt(_nonce(_MANIFEST_INDEX), data, _ad(_MANIFEST_AD, 0))
        except AuthenticationError:
            raise MediaError("media manifest does not decrypt with the shared key") from None
        manifest = Manifest.decode(plain)
        if manifest.size != self.ref.size:
            raise MediaError("media manifest size differs from the shared reference")
        self.manifest = manifest
        return manifest

    def block(self, data: bytes) -> bytes:
        manifest = self.manifest
        if manifest is None or self._next >= len(manifest.blocks):
            raise MediaError("media block out of order")
        index = self._next
        if block_hash(data) != manifest.blocks[index]:
            raise MediaError(f"media block {index} does not match its hash (tampered or corrupt)")
        try:
            plain = self._aead.decrypt(_nonce(index), data, _ad(_BLOCK_AD, index))
        except AuthenticationError:
            raise MediaError(f"media block {index} fails authentication") from None
        self._next += 1
        self._plain.update(plain)
        self._size += len(plain)
        return plain

    def finish(self) -> None:
        manifest = self.manifest
        if manifest is None or self._next != len(manifest.blocks):
            raise MediaError("media download incomplete")
        if self._size != manifest.size or self._plain.digest() != manifest.plaintext_hash:
            raise MediaError("media content does not match its manifest")
