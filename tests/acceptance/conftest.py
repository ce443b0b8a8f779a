"""Fixtures of the acceptance suite: a REAL server process, REAL sockets, REAL databases.

* ``database`` (module scope): a SQLite file, or a brand-new PostgreSQL database (dropped
  afterwards); the PostgreSQL parameter is marked ``postgres``.
* ``server`` (module scope): ``python -m kalandra_core serve`` on that database, TCP and QUIC on
  ephemeral ports, killed at module end whatever happened. The scenarios of a module share it
  (startup costs about a second); each test makes its own accounts and rooms.
* ``transport`` (per test): "tcp" or "quic".
* ``harness`` (per test): accounts, clients and raw connections on ``server`` over
  ``transport``; every client and connection is closed at teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from acceptance.acceptance_harness import Harness, ServerProcess, fresh_database, running_server
from helpers.native import within

from kalandra_core.storage.sql import SqlStore

DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=DATABASES)
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    kind: str = request.param
    with fresh_database(kind, tmp_path_factory.mktemp(f"db-{kind}")) as url:
        yield url


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server"), database) as proc:
        yield proc


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def harness(server: ServerProcess, transport: str, tmp_path: Path) -> AsyncIterator[Harness]:
    store = await within(SqlStore.open(server.database, migrate=False))
    h = Harness(server, transport, store, tmp_path)
    try:
        yield h
    finally:
        try:
            await h.close()
        finally:
            await store.close()
