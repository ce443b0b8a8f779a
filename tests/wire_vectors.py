"""The reference wire vectors (tests/vectors/kalandra-wire.json), for the tests that check them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).parent / "vectors"


def load_wire_vectors() -> list[dict[str, Any]]:
    with open(VECTORS / "kalandra-wire.json", encoding="utf-8") as fh:
        data: list[dict[str, Any]] = json.load(fh)
    return data
