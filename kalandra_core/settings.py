"""The config file (YAML) as the core reads it: ``database.url`` and the ``server`` section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .server.config import ServerConfig


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class CoreSettings:
    database: str
    server: ServerConfig


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


def load_settings(path: Path) -> CoreSettings:
    data = read_yaml(path)
    database = (data.get("database") or {}).get("url")
    if not isinstance(database, str):
        raise ConfigError(f"{path}: no database.url")
    base = path.resolve().parent
    try:
        server = ServerConfig.from_mapping(data.get("server") or {}, base=base)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if database.startswith("sqlite:///") and not database.startswith("sqlite:////"):
        # Relative SQLite paths are relative to the config file, not the working directory.
        database = f"sqlite:///{base / database.removeprefix('sqlite:///')}"
    server.database = database
    return CoreSettings(database=database, server=server)
