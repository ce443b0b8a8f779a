"""Fixtures shared by the integration modules: the store suites' databases and an embedded
server on SQLite (TCP on a free port, no QUIC)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from integration.store_helpers import SQL_ENGINES

from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import ServerConfig


@pytest.fixture(params=SQL_ENGINES)
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on each SQL engine."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The embedded server on a fresh SQLite file (a module may define its own)."""
    running = await start_server(
        ServerConfig(
            database=f"sqlite:///{tmp_path / 'k.db'}",
            tcp_port=0,
            quic_port=None,
            data_dir=tmp_path,
        )
    )
    try:
        yield running
    finally:
        await running.close()
