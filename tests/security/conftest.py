"""The homeserver the frame-level security tests attack: a real server (TCP listener, SQLite
file in the test's directory), with a small payload limit so that it is reachable in a test.

``db_url`` is a fresh database on each engine (SQLite, PostgreSQL) and ``db_server`` the same
server on it, for the modules whose every test runs on both."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import Limits, MediaConfig, ServerConfig

MAX_PAYLOAD = 64 * 1024
ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def server_config(
    tmp_path: Path,
    *,
    rate: float = 2000.0,
    burst: int = 2000,
    database: str | None = None,
    media: MediaConfig | None = None,
) -> ServerConfig:
    """Rate limits high enough by default that only the flood test meets them."""
    return ServerConfig(
        database=database or f"sqlite:///{tmp_path / 'kalandra.db'}",
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        limits=Limits(rate_per_second=rate, rate_burst=burst, max_payload_size=MAX_PAYLOAD),
        media=media or MediaConfig(),
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(server_config(tmp_path))
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest) -> str:
    """A brand-new database on each engine (the root conftest's fixtures)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def db_server(tmp_path: Path, db_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(server_config(tmp_path, database=db_url))
    try:
        yield running
    finally:
        await running.close()
