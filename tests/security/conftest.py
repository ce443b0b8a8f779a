"""The homeserver the frame-level security tests attack: a real server (TCP listener, SQLite
file in the test's directory), with a small payload limit so that it is reachable in a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kalandra_core.server.app import RunningServer, start_server
from kalandra_core.server.config import Limits, ServerConfig

MAX_PAYLOAD = 64 * 1024


def server_config(
    tmp_path: Path, *, rate: float = 2000.0, burst: int = 2000, database: str | None = None
) -> ServerConfig:
    """Rate limits high enough by default that only the flood test meets them; the database is
    a SQLite file in ``tmp_path`` unless ``database`` names another."""
    return ServerConfig(
        database=database or f"sqlite:///{tmp_path / 'kalandra.db'}",
        tcp_port=0,
        quic_port=None,
        data_dir=tmp_path,
        limits=Limits(rate_per_second=rate, rate_burst=burst, max_payload_size=MAX_PAYLOAD),
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(server_config(tmp_path))
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def each_db_url(request: pytest.FixtureRequest) -> str:
    """A fresh SQLite file, then a fresh PostgreSQL database."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def server_on_each_db(each_db_url: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The same server on each database."""
    running = await start_server(server_config(tmp_path, database=each_db_url))
    try:
        yield running
    finally:
        await running.close()
