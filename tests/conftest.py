"""Shared fixtures: the wire vectors, and fresh databases on the real engines."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

VECTORS = Path(__file__).parent / "vectors"

# Tests end `kalandra tail` (and other children) with SIGINT, as Ctrl-C does. A test run started
# in the background by a shell without job control inherits SIGINT *ignored*, and so would every
# child (an ignored signal stays ignored across exec), which then never ends: a handler here
# (not SIG_IGN) is reset to the default in each child instead.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The PostgreSQL server the tests use (trust auth on these machines; override for others).
PG_ADMIN_DSN = os.environ.get("KALANDRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kalandra.db'}"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A brand-new PostgreSQL database, dropped afterwards."""
    name = f"kalandra_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
