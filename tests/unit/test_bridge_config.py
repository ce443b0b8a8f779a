"""The bridge's config file: upgrade from the example, secrets, permissions, registration."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mautrix.util.config import ConfigValueError
from ruamel.yaml import YAML

from bridge.config import EXAMPLE_CONFIG, Config, example_options, leaf_paths

REPO = Path(__file__).resolve().parents[2]
SET_UP = {"homeserver": {"address": "http://127.0.0.1:8008", "domain": "localhost"}}


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return YAML(typ="safe").load(fh)


def write_yaml(path: Path, data: Any) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        YAML().dump(data, fh)
    return path


def example() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(EXAMPLE_CONFIG)
    return data


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def get_path(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[key]
    return data


def upgraded(path: Path, *, save: bool = True) -> Config:
    config = Config(str(path), str(path.parent / "registration.yaml"), str(EXAMPLE_CONFIG))
    config.load()
    config.update(save=save)
    return config


def run_bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


USER_MAPS = {"bridge.permissions", "bridge.relay.message_formats", "logging"}


def test_the_options_are_every_leaf_of_the_example_but_the_user_maps() -> None:
    options = example_options(example())
    assert set(leaf_paths(example())) == set(options) | USER_MAPS
    assert USER_MAPS.isdisjoint(options)
    assert len(options) == len(set(options)) > 90
    assert options[:2] == ["database.url", "server.tcp_host"]  # the example's order
    assert "server.limits.key_package_fetch_burst" in options
    assert "bridge.encryption.rotation.disable_device_change_key_rotation" in options


def test_an_option_added_to_the_example_is_an_option(tmp_path: Path) -> None:
    # Nothing else to update: the example is the list.
    base = example()
    base["bridge"]["new_option"] = {"depth": 1}
    data = {**SET_UP, "bridge": {"new_option": {"depth": 7}, "command_prefix": "!k"}}
    path = write_yaml(tmp_path / "config.yaml", data)
    config = Config(
        str(path), str(tmp_path / "r.yaml"), str(write_yaml(tmp_path / "example.yaml", base))
    )
    config.load()
    config.update(save=True)
    assert config.dropped == []
    assert load_yaml(path)["bridge"]["new_option"] == {"depth": 7}
    assert load_yaml(path)["bridge"]["command_prefix"] == "!k"


def test_a_config_missing_options_gains_them_and_keeps_its_values(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "config.yaml",
        {
            "database": {"url": "sqlite:///mine.db"},
            "server": {"tcp_port": 5555, "limits": {"rate_burst": 7}},
            **SET_UP,
            "bridge": {"command_prefix": "!k", "permissions": {"@me:localhost": "admin"}},
        },
    )
    upgraded(path)
    text = path.read_text()
    saved = load_yaml(path)
    assert set(leaf_paths(saved)) == set(leaf_paths(example()))
    assert saved["database"]["url"] == "sqlite:///mine.db"
    assert saved["server"]["tcp_port"] == 5555
    assert saved["server"]["limits"]["rate_burst"] == 7
    assert saved["server"]["limits"]["batch_max"] == example()["server"]["limits"]["batch_max"]
    assert saved["bridge"]["command_prefix"] == "!k"
    assert saved["bridge"]["epoch_notices"] is False  # new option, example's value
    # A map the user owns is the user's, whole: no example entries mixed in.
    assert saved["bridge"]["permissions"] == {"@me:localhost": "admin"}
    # Comments come from the example, including the one after the replaced map.
    assert "# Relay mode: users with only the relay permission" in text
    assert "# Python logging (dictConfig) for the whole process." in text
    # The core reads the same file.
    from kalandra_core.settings import load_settings

    assert load_settings(path).server.tcp_port == 5555


def test_every_user_value_survives_the_upgrade(tmp_path: Path) -> None:
    data = example()
    options = example_options(example())
    for n, option in enumerate(options):
        set_path(data, option, f"value {n}")
    data["bridge"]["permissions"] = {"*": "user"}
    data["logging"] = {"version": 1, "root": {"level": "DEBUG"}}
    path = write_yaml(tmp_path / "config.yaml", data)
    upgraded(path)
    saved = load_yaml(path)
    for n, option in enumerate(options):
        assert get_path(saved, option) == f"value {n}", option
    assert saved["bridge"]["permissions"] == {"*": "user"}
    assert saved["logging"] == {"version": 1, "root": {"level": "DEBUG"}}


def test_an_explicit_null_is_a_user_value(tmp_path: Path) -> None:
    data = {**SET_UP, "server": {"quic_port": None, "tcp_port": 4000}}
    path = write_yaml(tmp_path / "config.yaml", data)
    upgraded(path)
    saved = load_yaml(path)
    assert saved["server"]["quic_port"] is None  # QUIC off, not the example's 4433
    assert saved["server"]["tcp_port"] == 4000
    assert "quic_port: null" in path.read_text()


def test_the_old_max_body_size_default_is_raised_and_other_values_kept(tmp_path: Path) -> None:
    # 1 MiB refused what one Synapse transaction can carry, and Synapse resends it forever.
    new = example()["appservice"]["max_body_size"]
    assert new >= 10
    for old, expected in ((1, new), (64, 64), (2, 2)):
        data = {**SET_UP, "appservice": {"max_body_size": old}}
        path = write_yaml(tmp_path / f"config-{old}.yaml", data)
        upgraded(path)
        assert load_yaml(path)["appservice"]["max_body_size"] == expected, old


def test_the_example_itself_round_trips_unchanged_but_for_secrets(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE_CONFIG.read_text())
    upgraded(path)
    before = EXAMPLE_CONFIG.read_text().splitlines()
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split(":")[0].strip() for _, b in changed] == ["mls_state_key", "shared_secret"]


def test_unknown_options_are_dropped_and_reported(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", {**SET_UP, "bridge": {"old_option": 1}})
    config = upgraded(path)
    assert config.dropped == ["bridge.old_option"]
    assert "old_option" not in path.read_text()


def test_the_state_key_is_generated_once_and_saved(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", dict(SET_UP))
    config = upgraded(path)
    key = load_yaml(path)["bridge"]["mls_state_key"]
    assert len(base64.b64decode(key, validate=True)) == 32
    assert config.mls_state_key == base64.b64decode(key)
    assert config.unsaved_secrets == []
    upgraded(path)
    assert load_yaml(path)["bridge"]["mls_state_key"] == key


def test_a_generated_key_that_is_not_saved_is_reported(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "config.yaml", dict(SET_UP))
    assert upgraded(path, save=False).unsaved_secrets == [
        "bridge.mls_state_key",
        "bridge.provisioning.shared_secret",
    ]
    result = run_bridge("-n", "-c", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert "bridge.mls_state_key was generated but could not be saved" in result.stderr


def test_example_values_and_secrets_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE_CONFIG.read_text())
    with pytest.raises(ConfigValueError, match=r"homeserver\.address"):
        upgraded(path).check_default_values()
    data = load_yaml(path) | SET_UP
    write_yaml(path, data)
    with pytest.raises(ConfigValueError, match=r"as_token.*python -m bridge -g"):
        upgraded(path).check_default_values()
    data["bridge"]["mls_state_key"] = base64.b64encode(b"short").decode()
    write_yaml(path, data)
    config = upgraded(path)
    config._check_tokens = False  # as with -g
    with pytest.raises(ConfigValueError, match="mls_state_key"):
        config.check_default_values()


def test_encryption_required_without_encryption_is_refused(tmp_path: Path) -> None:
    data = example() | SET_UP
    data["bridge"] = dict(data["bridge"])
    data["bridge"]["encryption"] = {"allow": False, "require": True}
    config = upgraded(write_yaml(tmp_path / "config.yaml", data))
    config._check_tokens = False
    with pytest.raises(ConfigValueError, match=r"encryption\.require.*allow"):
        config.check_default_values()


def test_running_with_the_example_tokens_is_refused(tmp_path: Path) -> None:
    data = example() | SET_UP
    path = write_yaml(tmp_path / "config.yaml", data)
    result = run_bridge("-c", str(path), cwd=tmp_path)
    assert result.returncode == 11
    assert "as_token" in result.stderr
    assert "python -m bridge -g" in result.stderr


def test_permissions_mxid_then_domain_then_everyone(tmp_path: Path) -> None:
    data: dict[str, Any] = {**SET_UP, "bridge": {"permissions": {}}}
    data["bridge"]["permissions"] = {
        "*": "relay",
        "example.org": "user",
        "@boss:example.org": "admin",
    }
    config = upgraded(write_yaml(tmp_path / "config.yaml", data))
    assert config.permission_level("@boss:example.org") == "admin"
    assert config.permission_level("@someone:example.org") == "user"
    assert config.permission_level("@someone:elsewhere.net") == "relay"
    data["bridge"]["permissions"] = {"example.org": "superuser"}
    config = upgraded(write_yaml(tmp_path / "config.yaml", data))
    assert config.permission_level("@someone:elsewhere.net") == "none"
    config._check_tokens = False
    with pytest.raises(ConfigValueError, match="superuser"):
        config.check_default_values()


@pytest.mark.parametrize(
    ("url", "mautrix"),
    [
        ("sqlite:///data/k.db", "sqlite:{dir}/data/k.db"),
        ("sqlite:////abs/k.db", "sqlite:/abs/k.db"),
        ("postgresql://u:p@127.0.0.1:5432/k", "postgres://u:p@127.0.0.1:5432/k"),
        ("postgres://u@h/k", "postgres://u@h/k"),
    ],
)
def test_mautrix_uses_the_same_database(tmp_path: Path, url: str, mautrix: str) -> None:
    config = upgraded(write_yaml(tmp_path / "config.yaml", {**SET_UP, "database": {"url": url}}))
    assert config.mautrix_database_url == mautrix.format(dir=tmp_path.resolve())
    assert config["appservice.database"] == config.mautrix_database_url


def test_generate_registration(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE_CONFIG.read_text())
    write_yaml(path, load_yaml(path) | SET_UP)
    registration = tmp_path / "registration.yaml"
    result = run_bridge("-g", "-c", str(path), "-r", str(registration), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reg = load_yaml(registration)
    appservice = load_yaml(path)["appservice"]
    assert reg == {
        "id": "kalandra",
        "url": "http://localhost:29340",
        "as_token": appservice["as_token"],
        "hs_token": appservice["hs_token"],
        "sender_localpart": "kalandrabot",
        "rate_limited": False,
        "namespaces": {
            "users": [{"regex": "@kalandra_.*:localhost", "exclusive": True}],
            "aliases": [{"regex": "#kalandra_.*:localhost", "exclusive": True}],
            "rooms": [],
        },
        "de.sorunome.msc2409.push_ephemeral": True,
        "receive_ephemeral": True,
        "org.matrix.msc3202": True,
        "io.element.msc4190": True,
    }
    assert len(reg["as_token"]) >= 32
    assert reg["as_token"] != reg["hs_token"]
    # Again: the installed registration stays valid (tokens are kept).
    assert run_bridge("-g", "-c", str(path), "-r", str(registration), cwd=tmp_path).returncode == 0
    assert load_yaml(registration)["as_token"] == reg["as_token"]


def test_help_and_a_missing_config(tmp_path: Path) -> None:
    result = run_bridge("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--generate-registration" in result.stdout
    result = run_bridge("-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "no such config file" in result.stderr
