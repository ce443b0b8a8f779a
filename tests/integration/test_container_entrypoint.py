"""The container's entrypoint (config/docker-run.sh), run as the image runs it, outside Docker:
first start writes the config (listening on the container's network) and stops with
instructions; once the admin has edited it, the second start writes the registration and stops;
arguments replace the default command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "config" / "docker-run.sh"


def _run(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KALANDRA_DATA": str(data),
        "KALANDRA_EXAMPLE_CONFIG": str(REPO / "example-config.yaml"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_first_starts_write_config_then_registration(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "No config found" in first.stdout
    yaml = YAML()
    config = yaml.load(tmp_path / "config.yaml")
    assert config["server"]["tcp_host"] == "0.0.0.0"
    assert config["appservice"]["hostname"] == "0.0.0.0"
    assert not (tmp_path / "registration.yaml").exists()

    # Unedited, the example's homeserver is refused: no registration for example.com.
    refused = _run(tmp_path)
    assert refused.returncode != 0
    assert not (tmp_path / "registration.yaml").exists()

    config["homeserver"]["address"] = "http://synapse:8008"
    config["homeserver"]["domain"] = "chat.test"
    config["appservice"]["address"] = "http://bridge:29340"
    yaml.dump(config, tmp_path / "config.yaml")
    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "app_service_config_files" in second.stdout
    registration = yaml.load(tmp_path / "registration.yaml")
    assert registration["url"] == "http://bridge:29340"
    assert registration["sender_localpart"] == "kalandrabot"
    # The tokens the registration carries were saved into the config.
    saved = yaml.load(tmp_path / "config.yaml")
    assert saved["appservice"]["as_token"] == registration["as_token"]


def test_arguments_replace_the_default_command(tmp_path: Path) -> None:
    done = _run(tmp_path, sys.executable, "-m", "kalandra_core", "frame", "decode", "00")
    assert done.returncode == 2  # the `kalandra` tool ran (and refused a 1-byte frame)
    assert not (tmp_path / "config.yaml").exists()
