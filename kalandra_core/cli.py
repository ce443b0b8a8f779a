"""The ``kalandra`` command (also ``python -m kalandra_core``).

Subcommands:
  frame decode HEX|-     one frame (hex) -> one JSON object on stdout
  frame encode JSON|-    the JSON shape of ``frame decode`` -> the frame's hex
  db upgrade|current|downgrade REV (--database URL | -c CONFIG)
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from .proto import Frame, ProtocolError
from .proto.inspect import frame_from_json, frame_to_json
from .storage.urls import DatabaseUrlError

EXIT_USAGE = 2


class CliError(Exception):
    pass


def _argument_text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _frame_decode(args: argparse.Namespace) -> int:
    text = "".join(_argument_text(args.hex).split())
    if text.startswith(("0x", "0X")):
        text = text[2:]
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise CliError("input is not hexadecimal") from None
    frame = Frame.decode(data)
    extra = len(data) - len(frame)
    if extra:
        print(f"note: {extra} bytes after the frame were ignored", file=sys.stderr)
    print(json.dumps(frame_to_json(frame), ensure_ascii=False))
    return 0


def _frame_encode(args: argparse.Namespace) -> int:
    try:
        obj = json.loads(_argument_text(args.json))
    except json.JSONDecodeError as exc:
        raise CliError(f"input is not JSON: {exc.msg} at line {exc.lineno}") from None
    print(frame_from_json(obj).encode().hex())
    return 0


def _database_url(args: argparse.Namespace) -> str:
    if args.database:
        return str(args.database)
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        with open(args.config, encoding="utf-8") as fh:
            config = YAML(typ="safe").load(fh)
    except YAMLError as exc:
        raise CliError(f"{args.config}: not valid YAML ({type(exc).__name__})") from None
    url = (config or {}).get("database", {}).get("url") if isinstance(config, dict) else None
    if not isinstance(url, str):
        raise CliError(f"{args.config}: no database.url")
    return url


def _db(args: argparse.Namespace) -> int:
    from .storage import migrations  # SQLAlchemy and alembic load only for db commands

    args.database = _database_url(args)
    if args.db_command == "upgrade":
        asyncio.run(migrations.upgrade(args.database, args.revision))
        print(f"schema at {args.revision}")
    elif args.db_command == "downgrade":
        asyncio.run(migrations.downgrade(args.database, args.revision))
        print(f"schema at {args.revision}")
    else:
        print(asyncio.run(migrations.current(args.database)) or "empty (no schema)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalandra", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    frame = sub.add_parser("frame", help="inspect and build wire frames")
    frame_sub = frame.add_subparsers(dest="frame_command", required=True)
    dec = frame_sub.add_parser("decode", help="decode a hex frame to JSON")
    dec.add_argument("hex", help="the frame as hex digits, or - to read stdin")
    dec.set_defaults(func=_frame_decode)
    enc = frame_sub.add_parser("encode", help="encode a JSON frame to hex")
    enc.add_argument("json", help="the frame as JSON (the shape decode prints), or - for stdin")
    enc.set_defaults(func=_frame_encode)

    db = sub.add_parser("db", help="database schema migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, help_text in (
        ("upgrade", "migrate to a revision (default: head)"),
        ("downgrade", "migrate back to a revision (e.g. -1 or base)"),
        ("current", "print the schema revision"),
    ):
        p = db_sub.add_parser(name, help=help_text)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--database", help="sqlite:///FILE or postgresql://...")
        where.add_argument("-c", "--config", help="read database.url from this config file")
        if name == "upgrade":
            p.add_argument("revision", nargs="?", default="head")
        elif name == "downgrade":
            p.add_argument("revision")
        p.set_defaults(func=_db)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ProtocolError, DatabaseUrlError, OSError) as exc:
        print(f"kalandra: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
