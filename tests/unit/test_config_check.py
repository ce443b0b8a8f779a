"""The database and server sections are checked on load: each wrong value is named with what it
takes and what the file has, for `kalandra serve` and the bridge alike; unknown options are a
warning."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from kalandra_core.server.config import ClusterConfig, Limits, MediaConfig, ServerConfig
from kalandra_core.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "example-config.yaml"
URL = {"url": "sqlite:///k.db"}


def write(path: Path, data: Any) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        YAML().dump(data, fh)
    return path


def error_of(tmp_path: Path, data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path / "config.yaml", data))
    message = str(caught.value)
    prefix = f"{tmp_path / 'config.yaml'}: "
    assert message.startswith(prefix)  # the file, then what is wrong in it
    return message.removeprefix(prefix)


def option_paths(cls: type, prefix: str) -> set[str]:
    paths = set()
    for option in fields(cls):
        if option.name == "database":  # database.url's copy, not an option of server
            continue
        factory: Any = option.default_factory  # (a dataclass for a section of options)
        if isinstance(factory, type) and is_dataclass(factory):
            paths |= option_paths(factory, f"{prefix}{option.name}.")
        else:
            paths.add(f"{prefix}{option.name}")
    return paths


def example_paths(node: Any, prefix: str) -> set[str]:
    paths = set()
    for key, value in node.items():
        if isinstance(value, dict):
            paths |= example_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"tcp_port": "abc"}, 'server.tcp_port: expected an integer 0-65535 or null, got "abc"'),
        ({"quic_port": 70000}, "server.quic_port: expected an integer 0-65535 or null, got 70000"),
        ({"tcp_port": -1}, "server.tcp_port: expected an integer 0-65535 or null, got -1"),
        ({"tcp_port": True}, "server.tcp_port: expected an integer 0-65535 or null, got true"),
        ({"tcp_port": 4434.5}, "server.tcp_port: expected an integer 0-65535 or null, got 4434.5"),
        ({"tcp_host": None}, "server.tcp_host: expected a string, got null"),
        ({"quic_host": 127}, "server.quic_host: expected a string, got 127"),
        ({"certificate": 5}, "server.certificate: expected a path (a string) or null, got 5"),
        ({"data_dir": None}, "server.data_dir: expected a path (a string), got null"),
        ({"data_dir": ["a"]}, "server.data_dir: expected a path (a string), got a list"),
        ({"limits": 5}, "server.limits: expected a mapping, got 5"),
        ({"media": "big"}, 'server.media: expected a mapping, got "big"'),
        (
            {"limits": {"rate_per_second": 0}},
            "server.limits.rate_per_second: expected a number > 0, got 0",
        ),
        (
            {"limits": {"idle_timeout": "2 minutes"}},
            'server.limits.idle_timeout: expected a number > 0, got "2 minutes"',
        ),
        (
            {"limits": {"rate_burst": 0}},
            "server.limits.rate_burst: expected an integer >= 1, got 0",
        ),
        (
            {"limits": {"media_rate_per_second": 0}},
            "server.limits.media_rate_per_second: expected a number > 0, got 0",
        ),
        (
            {"limits": {"media_rate_burst": 0.5}},
            "server.limits.media_rate_burst: expected an integer >= 1, got 0.5",
        ),
        (
            {"limits": {"send_buffer": -8}},
            "server.limits.send_buffer: expected an integer >= 0, got -8",
        ),
        (
            {"limits": {"sync_max": {"a": 1}}},
            "server.limits.sync_max: expected an integer >= 1, got a mapping",
        ),
        (
            {"limits": {"handshake_timeout": float("nan")}},
            "server.limits.handshake_timeout: expected a number > 0, got NaN",
        ),
        (
            {"media": {"quota_per_member": -1}},
            "server.media.quota_per_member: expected an integer >= 0, got -1",
        ),
        (
            {"media": {"max_size": "x" * 60}},
            f'server.media.max_size: expected an integer >= 0, got "{"x" * 37}..."',
        ),
    ],
)
def test_a_wrong_value_is_named_with_what_it_takes(
    tmp_path: Path, server: dict[str, Any], message: str
) -> None:
    assert error_of(tmp_path, {"database": URL, "server": server}) == message


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ({}, "database.url: missing; expected a string"),
        (None, "database.url: missing; expected a string"),
        ({"url": 5}, "database.url: expected a string, got 5"),
        ("sqlite:///k.db", 'database: expected a mapping, got "sqlite:///k.db"'),
    ],
)
def test_database_url(tmp_path: Path, database: Any, message: str) -> None:
    assert error_of(tmp_path, {"database": database}) == message


def test_every_wrong_value_is_named_at_once_in_the_files_order(tmp_path: Path) -> None:
    data = {
        "database": {"url": None},
        "server": {"tcp_port": "x", "limits": {"batch_max": 0}, "quic_port": "y"},
    }
    assert error_of(tmp_path, data) == (
        "database.url: expected a string, got null; "
        'server.tcp_port: expected an integer 0-65535 or null, got "x"; '
        "server.limits.batch_max: expected an integer >= 1, got 0; "
        'server.quic_port: expected an integer 0-65535 or null, got "y"'
    )


def test_right_values_load_as_their_type(tmp_path: Path) -> None:
    path = write(
        tmp_path / "config.yaml",
        {
            "database": URL,
            "server": {
                "tcp_port": 0,  # any free port
                "quic_port": None,  # off
                "certificate": "tls/cert.pem",
                "server_key": "/abs/server.key",
                "limits": {"rate_per_second": 5, "send_buffer": 1e6, "max_clock_skew_ms": 0},
                "media": None,  # the defaults
            },
        },
    )
    server = load_settings(path).server
    assert (server.tcp_port, server.quic_port) == (0, None)
    assert server.certificate == tmp_path.resolve() / "tls/cert.pem"
    assert server.server_key == Path("/abs/server.key")
    assert server.data_dir == tmp_path.resolve()  # unset: the config's directory
    assert server.limits.rate_per_second == 5.0
    assert isinstance(server.limits.rate_per_second, float)
    assert server.limits.send_buffer == 1_000_000
    assert isinstance(server.limits.send_buffer, int)
    assert server.media == MediaConfig()
    assert server.database == f"sqlite:///{tmp_path.resolve() / 'k.db'}"


def test_unknown_options_are_a_warning_naming_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {
        "database": {**URL, "pool_size": 5},
        "server": {"tcp_prot": 4444, "limits": {"rate_brust": 3}, "tcp_port": 4000},
        "bridge": {"anything": 1},  # not these sections': not theirs to judge
    }
    path = write(tmp_path / "config.yaml", data)
    with caplog.at_level(logging.WARNING, logger="kalandra.config"):
        settings = load_settings(path)
    assert settings.server.tcp_port == 4000
    unknown = ["database.pool_size", "server.tcp_prot", "server.limits.rate_brust"]
    assert settings.unknown == unknown
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: unknown option(s) ignored: {', '.join(unknown)}"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kalandra.config"):
        load_settings(path, warn_unknown=False)  # the bridge reports them itself
    assert caplog.records == []


def test_the_example_and_the_checked_options_are_the_same(tmp_path: Path) -> None:
    # Each option of the example is checked, each checked option is in the example, and the
    # example says the defaults the code has.
    example = YAML(typ="safe").load(EXAMPLE.read_text())
    assert example_paths(example["server"], "server.") == option_paths(ServerConfig, "server.")
    assert set(example["database"]) == {"url"}
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE.read_text())
    settings = load_settings(path)
    assert settings.unknown == []
    defaults = ServerConfig()
    for name in ("tcp_host", "tcp_port", "quic_host", "quic_port", "certificate"):
        assert getattr(settings.server, name) == getattr(defaults, name), name
    assert settings.server.limits == Limits()
    assert settings.server.media == MediaConfig()
    assert settings.server.cluster == ClusterConfig()


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


BAD = {"database": URL, "server": {"tcp_port": "abc", "limits": {"idle_timeout": 0}}}
SAID = (
    'server.tcp_port: expected an integer 0-65535 or null, got "abc"; '
    "server.limits.idle_timeout: expected a number > 0, got 0"
)


def test_kalandra_serve_refuses_a_wrong_value(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", BAD)
    result = run("kalandra_core", "serve", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"kalandra: error: {path}: {SAID}\n"
    assert not (tmp_path / "k.db").exists()  # nothing started


def test_the_bridge_refuses_a_wrong_value_as_mautrix_does(tmp_path: Path) -> None:
    data = YAML(typ="safe").load(EXAMPLE.read_text())
    data["homeserver"] = {"address": "http://127.0.0.1:8008", "domain": "localhost"}
    data["appservice"]["as_token"] = "a" * 32
    data["appservice"]["hs_token"] = "h" * 32
    data["database"] = BAD["database"]
    data["server"]["tcp_port"] = "abc"
    data["server"]["limits"]["idle_timeout"] = 0
    path = write(tmp_path / "config.yaml", data)
    result = run("bridge", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 11  # mautrix's exit status for a configuration error
    assert f"Configuration error: {path}: {SAID}\n" in result.stderr
    assert "Traceback" not in result.stderr


def _settings(tmp_path: Path, database: str, cluster: dict[str, Any]) -> Any:
    path = tmp_path / "config.yaml"
    config = {"database": {"url": database}, "server": {"cluster": cluster}}
    path.write_text(json.dumps(config))
    return load_settings(path)


def test_cluster_mode_needs_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.cluster\.enabled needs a PostgreSQL"):
        _settings(tmp_path, "sqlite:///k.db", {"enabled": True})
    _settings(tmp_path, "sqlite:///k.db", {"enabled": False})  # off: SQLite is fine
    pg = "postgresql://u@127.0.0.1/k"
    settings = _settings(tmp_path, pg, {"enabled": True, "node_name": "a"})
    assert settings.server.cluster.enabled is True
    assert settings.server.cluster.lease_seconds == 10.0
    with pytest.raises(ConfigError, match="renew_seconds must be below lease_seconds"):
        _settings(tmp_path, pg, {"enabled": True, "lease_seconds": 2, "renew_seconds": 2})


def test_rebalancing_is_on_by_default_and_its_interval_positive(tmp_path: Path) -> None:
    pg = "postgresql://u@127.0.0.1/k"
    cluster = _settings(tmp_path, pg, {"enabled": True}).server.cluster
    assert (cluster.rebalance, cluster.rebalance_seconds) == (True, 5.0)
    cluster = _settings(tmp_path, pg, {"enabled": True, "rebalance": False}).server.cluster
    assert cluster.rebalance is False
    with pytest.raises(ConfigError, match=r"server\.cluster\.rebalance_seconds"):
        _settings(tmp_path, pg, {"enabled": True, "rebalance_seconds": 0})


def test_a_switch_takes_true_or_false_only(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r'server\.cluster\.enabled: expected true or false, got "yes"'
    ):
        _settings(tmp_path, "postgresql://u@127.0.0.1/k", {"enabled": "yes"})
    with pytest.raises(
        ConfigError, match=r"server\.cluster\.enabled: expected true or false, got 1"
    ):
        _settings(tmp_path, "postgresql://u@127.0.0.1/k", {"enabled": 1})
