"""Shared helpers of the conformance checks: hex decoding and field comparison."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Vector = dict[str, Any]
Check = Callable[[Vector], None]


class Mismatch(Exception):
    """A computed value differs from the vector; the message names the field, never the bytes."""


def h(value: object) -> bytes:
    """Decode one hex field of a vector."""
    if not isinstance(value, str):
        raise TypeError(f"expected a hex string, got {type(value).__name__}")
    return bytes.fromhex(value)


def expect(field: str, expected: object, got: object) -> None:
    if expected != got:
        raise Mismatch(field)


def expect_raises(field: str, func: Callable[[], object]) -> None:
    """``func`` must fail: used where the vector says there is no value (e.g. a leaf's child)."""
    try:
        func()
    except Exception:
        return
    raise Mismatch(f"{field}: expected no value, got one")
