"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults.private_postgres import PrivatePostgres, private_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the module's own, which its tests may stop and start."""
    with private_postgres() as server:
        yield server
