"""Database URLs as users write them, and as SQLAlchemy/alembic need them."""

from __future__ import annotations

from typing import Final

VERSION_TABLE: Final = "kalandra_schema_version"

_SCHEMES: Final = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class DatabaseUrlError(ValueError):
    pass


class DatabaseRefused(Exception):
    """The database answered but refused us: a configuration error, not an outage."""


def sqlalchemy_url(url: str) -> str:
    """``sqlite:///x.db`` -> ``sqlite+aiosqlite:///x.db``; ``postgres://`` -> asyncpg."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise DatabaseUrlError(
            "database URL must start with sqlite:///, postgresql:// or postgres://"
        )
    return f"{_SCHEMES[scheme]}://{rest}"


def engine_name(url: str) -> str:
    """'sqlite' or 'postgresql'."""
    return sqlalchemy_url(url).split("+", 1)[0]


def postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (False for anything else, however wrong)."""
    return url.partition("://")[0] in ("postgres", "postgresql", "postgresql+asyncpg")
