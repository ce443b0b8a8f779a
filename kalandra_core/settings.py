"""The config file (YAML) as the core reads it: ``database.url`` and the ``server`` section.

Both are checked on load: a wrong value is a ConfigError naming the option, what it takes and
what the file has; an option these sections do not have is a warning (a typo), not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .config_check import OptionErrors, load_section
from .server.config import ServerConfig
from .storage.urls import postgres_url

log = logging.getLogger("kalandra.config")


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class DatabaseSection:
    url: str  # no default: required


@dataclass(slots=True)
class CoreSettings:
    database: str
    server: ServerConfig
    unknown: list[str] = field(default_factory=list)  # options these sections do not have


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = YAML(typ="safe").load(fh)
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top")
    return data


def load_settings(path: Path, *, warn_unknown: bool = True) -> CoreSettings:
    """The ``database`` and ``server`` sections of the file; unknown options are logged as a
    warning unless ``warn_unknown`` is false (the bridge reports them itself)."""
    data = read_yaml(path)
    base = path.resolve().parent
    problems: list[str] = []
    unknown: list[str] = []
    try:
        section, unknown = load_section(DatabaseSection, data.get("database"), "database")
        database = section.url
    except OptionErrors as exc:
        problems += exc.problems
    try:
        server, unknown_server = ServerConfig.from_mapping(data.get("server"), base=base)
        unknown += unknown_server
    except OptionErrors as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems)}")
    if unknown and warn_unknown:
        log.warning("%s: unknown option(s) ignored: %s", path, ", ".join(unknown))
    if database.startswith("sqlite:///") and not database.startswith("sqlite:////"):
        # Relative SQLite paths are relative to the config file, not the working directory.
        database = f"sqlite:///{base / database.removeprefix('sqlite:///')}"
    server.database = database
    cluster = server.cluster
    if cluster.enabled and not postgres_url(database):
        raise ConfigError(
            f"{path}: server.cluster.enabled needs a PostgreSQL database.url (the processes "
            "share its log and leases); SQLite serves one process only"
        )
    if cluster.enabled and cluster.renew_seconds >= cluster.lease_seconds:
        raise ConfigError(
            f"{path}: server.cluster.renew_seconds must be below lease_seconds "
            f"({cluster.renew_seconds:g} >= {cluster.lease_seconds:g})"
        )
    return CoreSettings(database=database, server=server, unknown=unknown)
