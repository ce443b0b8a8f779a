"""``make run``: a local homeserver on the embedded default (SQLite), with two demo accounts.

First run: creates ``.data/config.yaml`` (from example-config.yaml's defaults), the database,
and the accounts alice and bob, whose device tokens go to ``.data/demo-users.txt`` (mode 0600).
Every run prints how to use the server with the ``kalandra`` client, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from pathlib import Path

from .private_files import write_private
from .server.app import serve_forever
from .settings import load_settings
from .storage.sql import SqlStore

CONFIG = """\
# Created by `make run` for a local trial; see example-config.yaml for every option.
database:
    url: sqlite:///kalandra.db
server:
    tcp_host: 127.0.0.1
    tcp_port: {tcp}
    quic_host: 127.0.0.1
    quic_port: {quic}
    data_dir: .
"""
DEMO_USERS = ("alice", "bob")


async def _demo_accounts(
    database: str, known: dict[str, tuple[int, str]]
) -> dict[str, tuple[int, str]]:
    """Create the demo accounts that do not exist yet; returns name -> (member id, token)."""
    store = await SqlStore.open(database)
    try:
        for name in DEMO_USERS:
            if name in known or await store.find_member(name) is not None:
                continue
            account = await store.create_member(name)
            known[name] = (account.member_id, await store.issue_token(account.member_id))
        return known
    finally:
        await store.close()


def _read_users(path: Path) -> dict[str, tuple[int, str]]:
    known: dict[str, tuple[int, str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, member_id, token = line.split()
            known[name] = (int(member_id), token)
    return known


def _write_users(path: Path, users: dict[str, tuple[int, str]]) -> None:
    lines = (f"{name} {member_id} {token}\n" for name, (member_id, token) in sorted(users.items()))
    write_private(path, "".join(lines))  # 0600 whatever the umask


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m kalandra_core.devrun")
    parser.add_argument("--data", default=".data")
    parser.add_argument("--tcp-port", type=int, default=4434)
    parser.add_argument("--quic-port", type=int, default=4433)
    args = parser.parse_args()
    data = Path(args.data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    config = data / "config.yaml"
    if not config.exists():
        config.write_text(CONFIG.format(tcp=args.tcp_port, quic=args.quic_port))
    settings = load_settings(config)
    users_file = data / "demo-users.txt"
    users = asyncio.run(_demo_accounts(settings.database, _read_users(users_file)))
    _write_users(users_file, users)
    server = settings.server
    kalandra = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "kalandra"
    tcp = f"tcp://{server.tcp_host}:{server.tcp_port}"
    print(f"\nKalandra homeserver (SQLite {settings.database.removeprefix('sqlite:///')})")
    print(f"  TCP  {tcp}")
    quic = f"quic://{server.quic_host}:{server.quic_port}"
    print(f"  QUIC {quic} (self-signed certificate: --ca {data}/server.crt)")
    print(f"\nDemo accounts (tokens in {data / 'demo-users.txt'}):")
    for name, (member_id, token) in sorted(users.items()):
        print(f"  {name}: member {member_id}")
        print(f"    {kalandra} login --server {tcp} --token {token} --state {data}/{name}.db")
    print("\nThen, for example:")
    print(f"  {kalandra} create-room --name demo --state {data}/alice.db      # prints ROOM")
    bob_id = users.get("bob", (0, ""))[0]
    print(f"  {kalandra} invite ROOM {bob_id} --state {data}/alice.db")
    print(f"  {kalandra} join --state {data}/bob.db")
    print(f"  {kalandra} send ROOM hello bob --state {data}/alice.db")
    print(f"  {kalandra} tail ROOM --state {data}/bob.db")
    print(f"\nMore accounts: {kalandra} admin create-user NAME -c {config}")
    print("`make run` runs this server inside the bridge, with a local Synapse.")
    print("Stop the server with Ctrl-C.\n", flush=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(server))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
