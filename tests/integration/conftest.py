"""Fixtures of the store suites."""

from __future__ import annotations

import pytest
from store_helpers import SQL_ENGINES


@pytest.fixture(params=SQL_ENGINES)
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on each SQL engine."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url
