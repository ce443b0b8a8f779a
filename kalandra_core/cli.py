"""The ``kalandra`` command (also ``python -m kalandra_core``).

Subcommands:
  serve -c CONFIG        run the homeserver
  admin create-user NAME | issue-token NAME | issue-code NAME | revoke-token NAME | list-users
        | forget-bridge
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
from pathlib import Path

from .proto import Frame, ProtocolError
from .proto.frame_json import frame_from_json, frame_to_json
from .storage.base import LOGIN_CODE_MAX_TTL, StoreError
from .storage.urls import DatabaseRefused, DatabaseUrlError

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
    if getattr(args, "database", None):
        return str(args.database)
    from .settings import load_settings

    return load_settings(Path(args.config)).database


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .server.app import serve_forever
    from .settings import load_settings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    settings = load_settings(Path(args.config))
    ready = Path(args.ready_file) if args.ready_file else None
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        asyncio.run(serve_forever(settings.server, ready_file=ready))
    except (SQLAlchemyError, CommandError) as exc:  # a failed migration: the reason, no trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {first}"
        raise CliError(f"migrating or opening the database failed: {why}") from None
    return 0


def _admin(args: argparse.Namespace) -> int:
    from .storage.sql import SqlStore

    async def run() -> int:
        store = await SqlStore.open(_database_url(args))
        try:
            if args.admin_command == "create-user":
                account = await store.create_member(args.name)
                token = await store.issue_token(account.member_id)
                print(f"member_id {account.member_id}")
                print(f"token {token}")
            elif args.admin_command in ("issue-token", "issue-code", "revoke-token"):
                found = await store.find_member(args.name)
                if found is None:
                    raise CliError(f"no user named {args.name!r}")
                if args.admin_command == "issue-token":
                    print(f"token {await store.issue_token(found.member_id)}")
                elif args.admin_command == "issue-code":
                    code = await store.issue_login_code(found.member_id)
                    print(f"code {code}")
                    print(f"valid {LOGIN_CODE_MAX_TTL // 60} minutes, once")
                else:
                    count = await store.revoke_tokens(found.member_id)
                    print(f"revoked {count} token(s) of {args.name}")
            elif args.admin_command == "forget-bridge":
                gone = await store.forget_bridge_bot()
                print("forgotten" if gone else "no bridge was recorded")
            else:
                for account in await store.list_members():
                    bound = "key bound" if account.signature_key else "no device yet"
                    print(f"{account.member_id}\t{account.name}\t{bound}")
        finally:
            await store.close()
        return 0

    return asyncio.run(run())


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

    serve = sub.add_parser("serve", help="run the Kalandra homeserver")
    serve.add_argument("-c", "--config", required=True, help="config file (YAML)")
    serve.add_argument("--ready-file", help=argparse.SUPPRESS)  # tests: ports once listening
    serve.set_defaults(func=_serve)

    admin = sub.add_parser("admin", help="accounts and device tokens")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    for name, help_text, takes_name in (
        ("create-user", "create an account; prints its member id and a device token", True),
        ("issue-token", "print a new device token for an account", True),
        ("issue-code", "print a single-use login code (10 minutes) for `kalandra login`", True),
        ("revoke-token", "revoke every device token of an account", True),
        ("list-users", "list accounts", False),
        (
            "forget-bridge",
            "cluster: stop naming the bridge's bot to clients (the bridge left the cluster)",
            False,
        ),
    ):
        p = admin_sub.add_parser(name, help=help_text)
        if takes_name:
            p.add_argument("name")
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--database", help="sqlite:///FILE or postgresql://...")
        where.add_argument("-c", "--config", help="read database.url from this config file")
        p.set_defaults(func=_admin)

    from .client.cli import add_client_commands

    add_client_commands(sub)

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
    except (
        CliError,
        ProtocolError,
        DatabaseUrlError,
        DatabaseRefused,
        StoreError,
        OSError,
        ValueError,
    ) as exc:
        print(f"kalandra: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
