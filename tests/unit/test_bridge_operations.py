"""The operations options (provisioning secret and prefix, metrics) and the metrics' counting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from mautrix.errors import MForbidden
from mautrix.util.config import ConfigValueError
from prometheus_client import REGISTRY
from ruamel.yaml import YAML

from bridge import metrics
from bridge.config import EXAMPLE_CONFIG, Config

SET_UP = {"homeserver": {"address": "http://127.0.0.1:8008", "domain": "localhost"}}


def upgraded(path: Path) -> Config:
    config = Config(str(path), str(path.parent / "registration.yaml"), str(EXAMPLE_CONFIG))
    config.load()
    config.update(save=True)
    return config


def write(path: Path, data: dict[str, Any]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        YAML().dump(data, fh)
    return path


def saved(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return YAML(typ="safe").load(fh)


def test_the_shared_secret_is_generated_once_and_saved(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", dict(SET_UP))
    upgraded(path)
    secret = saved(path)["bridge"]["provisioning"]["shared_secret"]
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert secret != "generate"
    upgraded(path)
    assert saved(path)["bridge"]["provisioning"]["shared_secret"] == secret
    assert saved(path)["metrics"] == {
        "enabled": False,
        "hostname": "127.0.0.1",
        "listen_port": 8000,
    }


def test_a_weak_secret_or_a_bad_prefix_is_refused(tmp_path: Path) -> None:
    data: dict[str, Any] = {
        **SET_UP,
        "appservice": {"as_token": "a" * 20, "hs_token": "h" * 20},
        "bridge": {"provisioning": {"shared_secret": "short"}},
    }
    path = write(tmp_path / "config.yaml", data)
    with pytest.raises(ConfigValueError, match=r"provisioning\.shared_secret"):
        upgraded(path).check_default_values()
    data["bridge"]["provisioning"] = {"shared_secret": "s" * 16, "prefix": "/provision/"}
    write(path, data)
    with pytest.raises(ConfigValueError, match=r"provisioning\.prefix"):
        upgraded(path).check_default_values()
    data["bridge"]["provisioning"] = {"shared_secret": "short", "enabled": False}
    write(path, data)
    upgraded(path).check_default_values()  # off: the secret does not matter


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_latency_toward_kalandra_runs_from_the_matrix_timestamp() -> None:
    count = "kalandra_bridge_latency_seconds_count"
    total = "kalandra_bridge_latency_seconds_sum"
    before = sample(count, direction="to_kalandra"), sample(total, direction="to_kalandra")
    messages = sample("kalandra_bridge_messages_total", direction="to_kalandra")
    metrics.matrix_event_seen("$a", int(time.time() * 1000) - 2000)
    metrics.bridged_to_kalandra("$a")
    assert sample(count, direction="to_kalandra") == before[0] + 1
    assert 2 <= sample(total, direction="to_kalandra") - before[1] < 60
    # Not seen in a transaction (a replay): counted, no latency.
    metrics.bridged_to_kalandra("$b")
    assert sample(count, direction="to_kalandra") == before[0] + 1
    assert sample("kalandra_bridge_messages_total", direction="to_kalandra") == messages + 2


def test_failures_are_counted_by_reason() -> None:
    forbidden = {"direction": "to_matrix", "reason": "M_FORBIDDEN"}
    timeout = {"direction": "to_matrix", "reason": "TimeoutError"}
    refused = {"direction": "to_kalandra", "reason": "m.no_permission"}
    before = [sample("kalandra_bridge_failures_total", **k) for k in (forbidden, timeout, refused)]
    metrics.failed_to_matrix(MForbidden(403, "no"))
    metrics.failed_to_matrix(TimeoutError())
    metrics.matrix_event_seen("$c", 0)
    metrics.failed_to_kalandra("$c", "m.no_permission")
    after = [sample("kalandra_bridge_failures_total", **k) for k in (forbidden, timeout, refused)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
