"""The ``frame`` and ``db`` commands, run as a user would (a real subprocess)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from wire_vectors import load_wire_vectors

FRAMES = [v for v in load_wire_vectors() if v["kind"] in ("frame_snapshot", "frame_signature")]


def kalandra(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kalandra_core", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_vector_decodes_to_json_and_encodes_back() -> None:
    # One process for all vectors keeps this fast; the subprocess tests below cover the CLI.
    from kalandra_core.proto import Frame
    from kalandra_core.proto.frame_json import frame_from_json, frame_to_json

    for v in FRAMES:
        raw = bytes.fromhex(v["hex"])
        obj = json.loads(json.dumps(frame_to_json(Frame.decode(raw))))
        assert frame_from_json(obj).encode() == raw, v["name"]


@pytest.mark.parametrize("name", ["snapshot_commit_frame", "signed_app_message_frame (synthetic)"])
def test_decode_then_encode_through_the_command(name: str) -> None:
    vector = next(v for v in FRAMES if v["name"] == name)
    dec = kalandra("frame", "decode", vector["hex"])
    assert dec.returncode == 0, dec.stderr
    obj: dict[str, Any] = json.loads(dec.stdout)
    header = obj["header"]
    assert set(header) == {
        "magic",
        "version",
        "flags",
        "opcode",
        "opcode_name",
        "request_id",
        "payload_size",
        "room_id",
        "sender_id",
        "context_id",
        "hlc_timestamp",
        "epoch",
        "signature",
    }
    assert len(header["room_id"]) == 32
    assert len(header["signature"]) == 128
    enc = kalandra("frame", "encode", "-", stdin=dec.stdout)
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout.strip() == vector["hex"]


def test_decoded_fields() -> None:
    vector = next(v for v in FRAMES if v["kind"] == "frame_signature")
    obj = json.loads(kalandra("frame", "decode", vector["hex"]).stdout)
    assert obj["header"]["opcode_name"] == "AppMessage"
    assert obj["header"]["room_id"] == "00000000000000000000000000001234"
    assert obj["header"]["sender_id"] == 42
    assert obj["header"]["context_id"] == 7
    assert obj["payload"]["nonce"] == "00000000000000010000000000000000abababababababab"


def test_raw_mls_payload_is_shown_as_hex() -> None:
    frame = {"header": {"opcode_name": "Commit", "epoch": 3}, "payload": "000100020003"}
    enc = kalandra("frame", "encode", json.dumps(frame))
    assert enc.returncode == 0, enc.stderr
    obj = json.loads(kalandra("frame", "decode", enc.stdout.strip()).stdout)
    assert obj["payload"] == "000100020003"
    assert obj["header"]["payload_size"] == 6


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("frame", "decode", "zz"), None, "not hexadecimal"),
        (("frame", "decode", "53554e44"), None, "too short"),
        (("frame", "decode", "00" * 128), None, "invalid magic"),
        (("frame", "encode", "{"), None, "not JSON"),
        (("frame", "encode", '{"header": {}}'), None, "opcode"),
        (("frame", "encode", '{"header": {"opcode": 8192}, "payload": {}}'), None, "missing"),
        (("frame", "decode", "-"), "", "too short"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    result = kalandra(*args, stdin=stdin)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]


def test_db_commands(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert kalandra("db", "current", "--database", url).stdout.strip() == "empty (no schema)"
    assert kalandra("db", "upgrade", "--database", url).returncode == 0
    from kalandra_core.storage.migrations import head_revision

    assert kalandra("db", "current", "--database", url).stdout.strip() == head_revision()
    assert kalandra("db", "downgrade", "--database", url, "base").returncode == 0
    bad = kalandra("db", "current", "--database", "mysql://nope")
    assert bad.returncode == 2
    assert "database URL" in bad.stderr


def test_db_commands_read_the_config_file(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"database:\n    url: sqlite:///{tmp_path / 'c.db'}\n")
    assert kalandra("db", "upgrade", "-c", str(config)).returncode == 0
    from kalandra_core.storage.migrations import head_revision

    assert kalandra("db", "current", "-c", str(config)).stdout.strip() == head_revision()
    config.write_text("database: {}\n")
    bad = kalandra("db", "current", "-c", str(config))
    assert bad.returncode == 2
    assert "database.url: missing; expected a string" in bad.stderr
    missing = kalandra("db", "current", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2


def test_forget_bridge_deletes_the_cluster_s_record_of_the_bridge_bot(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert kalandra("db", "upgrade", "--database", url).returncode == 0

    async def record() -> tuple[int, str] | None:
        from kalandra_core.storage.sql import SqlStore

        store = await SqlStore.open(url, migrate=False)
        try:
            await store.record_bridge_bot(7, "@bot:example.org")
            return await store.bridge_bot()
        finally:
            await store.close()

    async def recorded() -> tuple[int, str] | None:
        from kalandra_core.storage.sql import SqlStore

        store = await SqlStore.open(url, migrate=False)
        try:
            return await store.bridge_bot()
        finally:
            await store.close()

    assert asyncio.run(record()) == (7, "@bot:example.org")
    done = kalandra("admin", "forget-bridge", "--database", url)
    assert (done.returncode, done.stdout.strip()) == (0, "forgotten")
    assert asyncio.run(recorded()) is None
    again = kalandra("admin", "forget-bridge", "--database", url)
    assert (again.returncode, again.stdout.strip()) == (0, "no bridge was recorded")
