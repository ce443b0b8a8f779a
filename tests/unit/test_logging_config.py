"""The logging configurations we ship (example-config.yaml's `logging`, config/logging.yaml):
valid for dictConfig, plain by default, one JSON object per line with the `json` formatter, and
no aiohttp access lines (their URLs may carry a homeserver's token in the query)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]


def _sections() -> dict[str, dict[str, Any]]:
    yaml = YAML(typ="safe")
    return {
        "example-config.yaml": yaml.load(REPO / "example-config.yaml")["logging"],
        "config/logging.yaml": yaml.load(REPO / "config" / "logging.yaml"),
    }


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], level = saved
    logging.root.setLevel(level)
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


def _configure(section: dict[str, Any], formatter: str) -> io.StringIO:
    stream = io.StringIO()
    section = json.loads(json.dumps(section))  # a copy
    section["handlers"]["console"]["formatter"] = formatter
    section["handlers"]["console"].pop("stream", None)
    logging.config.dictConfig(section)
    handler = logging.root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return stream


@pytest.mark.parametrize("name", ["example-config.yaml", "config/logging.yaml"])
def test_json_formatter_writes_one_object_per_line(name: str) -> None:
    stream = _configure(_sections()[name], "json")
    logging.getLogger("kalandra.test").warning("room %s: %d frames", "ab12", 3)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "room ab12: 3 frames"
    assert record["levelname"] == "WARNING"
    assert record["name"] == "kalandra.test"


@pytest.mark.parametrize("name", ["example-config.yaml", "config/logging.yaml"])
def test_plain_is_the_default(name: str) -> None:
    assert _sections()[name]["handlers"]["console"]["formatter"] == "plain"
    stream = _configure(_sections()[name], "plain")
    logging.getLogger("kalandra.test").warning("hello")
    assert stream.getvalue().rstrip().endswith("WARNING kalandra.test: hello")


def test_access_lines_are_not_logged() -> None:
    stream = _configure(_sections()["example-config.yaml"], "plain")
    logging.getLogger("aiohttp.access").info('"PUT /transactions/1?access_token=secret" 200')
    logging.getLogger("aiohttp.server").warning("kept")
    assert "secret" not in stream.getvalue()
    assert "kept" in stream.getvalue()
