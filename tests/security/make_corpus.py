"""Writes the fuzz seed corpus, tests/security/corpus/*.bin (run this file with python).

Each file is a byte stream as a peer could send it: the reference wire vectors' frames, real
MLS messages in frames, and hostile frames (truncated or lying headers, wrong magic, huge
declared sizes, bad or deeply nested CBOR, giant integers, wrong types). Everything but the
MLS entries (which hold fresh HPKE randomness) comes out byte-identical on every run. The
corpus is committed; tests read the files, never this script.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import cbor2

from kalandra_core.mls.group import MlsGroup
from kalandra_core.mls.keypackage import build_key_package
from kalandra_core.proto import HEADER_SIZE, MAX_PAYLOAD_SIZE, FrameHeader, Opcode

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
VECTORS = HERE.parent / "vectors" / "kalandra-wire.json"
SEED_A = bytes(range(32))
SEED_B = bytes(range(32, 64))


def frame(opcode: int, payload: bytes, *, size: int | None = None, **fields: int) -> bytes:
    """Header + payload; ``size`` overrides payload_size (a lying header)."""
    parsed = FrameHeader(opcode, payload_size=len(payload))
    for name, value in fields.items():
        setattr(parsed, name, value)
    header = bytearray(parsed.to_bytes())
    if size is not None:
        struct.pack_into(">I", header, 12, size)
    return bytes(header) + payload


def nested(prefix: bytes, depth: int, leaf: bytes = b"\x00") -> bytes:
    return prefix * depth + leaf


def vectors() -> Iterator[tuple[str, bytes]]:
    for vector in json.loads(VECTORS.read_text(encoding="utf-8")):
        if vector["kind"] in ("frame_snapshot", "frame_signature"):
            name = vector["name"].split(" ")[0].removeprefix("snapshot_")
            yield f"vector-{name}", bytes.fromhex(vector["hex"])


def mls() -> Iterator[tuple[str, bytes]]:
    bundle = build_key_package(2, SEED_B)
    group = MlsGroup.create(1, SEED_A, group_id=bytes(16))
    yield "mls-key-package", frame(Opcode.KEY_PACKAGE, bundle.key_package, sender_id=2)
    yield "mls-group-info", frame(Opcode.GROUP_INFO, group.group_info(), room_id=1, sender_id=1)
    out = group.add([bundle.key_package])
    yield "mls-commit", frame(Opcode.COMMIT, out.commit, room_id=1, sender_id=1)
    yield (
        "mls-welcome",
        frame(Opcode.WELCOME, out.welcomes[2], room_id=1, sender_id=1, context_id=2, epoch=1),
    )
    kp = bundle.key_package
    yield "mls-key-package-truncated", frame(Opcode.KEY_PACKAGE, kp[: len(kp) // 2])
    # A huge TLS vector length prefix (MLS varint, 4-byte form) right after the version.
    yield "mls-huge-vector-length", frame(Opcode.COMMIT, b"\x00\x01\x00\x01\xbf\xff\xff\xff")


def hostile() -> Iterator[tuple[str, bytes]]:
    ping = frame(Opcode.PING, b"")
    for n in (0, 1, 4, 5, 16, 64, HEADER_SIZE - 1):
        yield f"truncated-header-{n}", ping[:n]
    yield "wrong-magic", b"DNUS" + ping[4:]
    yield "wrong-magic-zero", bytes(HEADER_SIZE)
    yield "wrong-version-0", ping[:4] + b"\x00" + ping[5:]
    yield "wrong-version-255", ping[:4] + b"\xff" + ping[5:]
    yield "huge-payload-size-u32-max", frame(Opcode.APP_MESSAGE, b"\xa0", size=2**32 - 1)
    yield "payload-size-max-plus-one", frame(Opcode.APP_MESSAGE, b"", size=MAX_PAYLOAD_SIZE + 1)
    yield "payload-size-max-announced", frame(Opcode.APP_MESSAGE, b"\xa0", size=MAX_PAYLOAD_SIZE)
    yield "payload-shorter-than-declared", frame(Opcode.HELLO, b"\xa1aa" + bytes(50), size=100)
    yield "payload-longer-than-declared", frame(Opcode.PING, b"", size=0) + b"\xff" * 200
    yield "two-frames-then-garbage", ping + ping + b"garbage" * 30
    yield "unknown-opcode", frame(0xBEEF, b"\xa0")
    yield "all-flags", ping[:5] + b"\xff" + ping[6:]
    yield (
        "max-ids",
        frame(
            Opcode.APP_MESSAGE,
            b"\xa0",
            room_id=2**128 - 1,
            sender_id=2**64 - 1,
            context_id=2**64 - 1,
            hlc_timestamp=2**64 - 1,
            epoch=2**64 - 1,
            request_id=2**32 - 1,
        ),
    )
    # Bad CBOR.
    yield "cbor-break-only", frame(Opcode.HELLO, b"\xff")
    yield "cbor-reserved-additional-info", frame(Opcode.HELLO, b"\x1c")
    yield "cbor-unterminated-indefinite-map", frame(Opcode.HELLO, b"\xbf\x61a\x01")
    yield "cbor-truncated-map", frame(Opcode.SYNC_REQUEST, b"\xa2\x6efrom_log_index")
    yield "cbor-invalid-utf8-key", frame(Opcode.GOODBYE, b"\xa1\x62\xc3\x28\x01")
    yield "cbor-invalid-utf8-value", frame(Opcode.GOODBYE, b"\xa1\x66reason\x62\xff\xfe")
    yield "cbor-empty-payload", frame(Opcode.APP_MESSAGE, b"")
    # Declared lengths far beyond the data (no allocation may follow them).
    yield "cbor-array-len-2-63", frame(Opcode.SYNC_RESPONSE, b"\x9b" + b"\x7f" + b"\xff" * 7)
    yield "cbor-map-len-2-32", frame(Opcode.HELLO, b"\xba\xff\xff\xff\xff")
    yield "cbor-bytes-len-2-32", frame(Opcode.HELLO, b"\xa1\x6aauth_token\x5a\xff\xff\xff\xff")
    yield "cbor-text-len-2-63", frame(Opcode.GOODBYE, b"\xa1\x66reason\x7b" + b"\x7f" * 8)
    # Deep nesting.
    yield "cbor-nested-arrays-10000", frame(Opcode.HELLO, nested(b"\x81", 10_000))
    yield "cbor-nested-maps-5000", frame(Opcode.HELLO, nested(b"\xa1\x00", 5_000))
    yield "cbor-nested-tags-10000", frame(Opcode.HELLO, nested(b"\xd8\x64", 10_000))
    yield "cbor-nested-indefinite-20000", frame(Opcode.SYNC_RESPONSE, nested(b"\x9f", 20_000))
    yield (
        "cbor-nested-in-field",
        frame(Opcode.APP_MESSAGE, b"\xa1\x6aciphertext" + nested(b"\x81", 5_000)),
    )
    # Giant integers and wrong types in well-formed CBOR.
    bignum = cbor2.dumps(cbor2.CBORTag(2, b"\xff" * 4096))
    yield "cbor-bignum-4k", frame(Opcode.SYNC_REQUEST, b"\xa1\x6efrom_log_index" + bignum)
    structs = {
        "hello-version-text": (Opcode.HELLO, {"version": "1"}),
        "hello-version-huge": (Opcode.HELLO, {"version": 2**64 - 1}),
        "hello-version-negative": (Opcode.HELLO, {"version": -(2**64)}),
        "hello-token-not-bytes": (Opcode.HELLO, {"version": 1, "auth_token": [256, -1, "x"]}),
        "hello-key-wrong-size": (Opcode.HELLO, {"version": 1, "signature_key": list(range(31))}),
        "sync-limit-float": (Opcode.SYNC_REQUEST, {"from_log_index": 0, "limit": 1.5}),
        "sync-index-bool": (Opcode.SYNC_REQUEST, {"from_log_index": True}),
        "sync-null-fields": (Opcode.SYNC_REQUEST, {"from_log_index": None, "to_epoch": None}),
        "message-nonce-23": (
            Opcode.APP_MESSAGE,
            {
                "epoch": 0,
                "sender_index": 0,
                "generation": 0,
                "nonce": b"\x00" * 23,
                "ciphertext": b"",
            },
        ),
        "message-push-keys-not-maps": (
            Opcode.APP_MESSAGE,
            {
                "epoch": 0,
                "sender_index": 2**32,
                "generation": 0,
                "nonce": b"\x00" * 24,
                "ciphertext": b"",
                "push_keys": [1, "two", None],
            },
        ),
        "receipt-kind-unknown": (
            Opcode.APP_RECEIPT,
            {"message_log_index": 0, "kind": "Seen", "timestamp": 0},
        ),
        "reaction-add-int": (
            Opcode.APP_REACTION,
            {"message_log_index": 0, "content": "x", "add": 1},
        ),
        "ban-duration-negative": (
            Opcode.BAN,
            {"user_id": 1, "reason": "", "duration_secs": -5, "moderator_id": 1},
        ),
        "kick-not-a-map": (Opcode.KICK, [1, "x", 1]),
        "error-code-too-big": (Opcode.ERROR, {"code": 70_000, "message": "x"}),
        "commit-wrapper-short-hash": (
            Opcode.COMMIT,
            {"commit_bytes": b"", "new_epoch": 1, "tree_hash": b"\x00", "is_external": False},
        ),
        "proposal-type-unknown": (
            Opcode.PROPOSAL,
            {"proposal_bytes": b"", "proposal_type": "Delete"},
        ),
        "group-info-handshake-int": (Opcode.GROUP_INFO, {"group_info": b"", "handshake": 5}),
        "map-non-text-keys": (Opcode.HELLO, {1: 1, b"\xff": 2, (1, 2): 3}),
    }
    for name, (opcode, value) in structs.items():
        yield f"type-{name}", frame(opcode, cbor2.dumps(value))
    yield "cbor-float-nan-half", frame(Opcode.SYNC_REQUEST, b"\xa1\x6efrom_log_index\xf9\x7e\x00")
    yield "cbor-undefined-simple", frame(Opcode.GOODBYE, b"\xa1\x66reason\xf7")
    yield "cbor-duplicate-keys", frame(Opcode.GOODBYE, b"\xa2\x66reason\x01\x66reason\x61x")


def entries() -> Iterator[tuple[str, bytes]]:
    yield from vectors()
    yield from mls()
    yield from hostile()


def main() -> int:
    CORPUS.mkdir(exist_ok=True)
    names = set()
    for name, data in entries():
        assert name not in names, name
        names.add(name)
        (CORPUS / f"{name}.bin").write_bytes(data)
    for stale in CORPUS.glob("*.bin"):
        if stale.stem not in names:
            stale.unlink()
    print(f"{len(names)} corpus files in {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
