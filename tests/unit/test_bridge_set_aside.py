"""What the queue toward Matrix retries and what it sets aside, and how oversized text is split
(bridge/portal/set_aside.py); the queue itself is tested against Synapse
(test_bridge_no_stall.py)."""

from __future__ import annotations

import sqlite3

import aiohttp
import pytest
from mautrix.errors import (
    IntentError,
    MatrixConnectionError,
    MatrixStandardRequestError,
    MForbidden,
    MLimitExceeded,
    MTooLarge,
    MUnknownToken,
)
from mautrix.errors.crypto import EncryptionError

from bridge.portal import set_aside
from bridge.portal.set_aside import (
    Attempts,
    content_size,
    notice_for,
    permanent_reason,
    split_text,
)
from kalandra_core.client.driver import ClientError


def refused_join() -> IntentError:
    try:
        try:
            raise MForbidden(403, "banned")
        except MForbidden as exc:
            raise IntentError("Failed to join") from exc
    except IntentError as error:
        return error


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (MForbidden(403, "banned"), "M_FORBIDDEN"),
        (MTooLarge(413, "too large"), "M_TOO_LARGE"),
        (MatrixStandardRequestError(400, "bad"), "HTTP 400"),
        (refused_join(), "M_FORBIDDEN"),
        (MLimitExceeded(429, "slow down"), None),
        (MUnknownToken(401, "who"), None),  # the bridge's own token: not the item's fault
        (MatrixStandardRequestError(502, "bad gateway"), None),
        (MatrixConnectionError("down"), None),
        (TimeoutError(), None),
        (OSError("database"), None),
    ],
)
def test_transient_and_permanent_failures(exc: BaseException, reason: str | None) -> None:
    assert permanent_reason(exc) == reason


@pytest.mark.parametrize(
    "text",
    [
        "x" * 100_000,
        "word " * 30_000,
        'é😀"\\\n' * 20_000,  # escapes count: each piece fits once encoded as JSON
        "short",
        "",
    ],
)
def test_split_text_keeps_every_character_in_order_and_each_piece_fits(text: str) -> None:
    limit = 15_000
    pieces = split_text(text, limit)
    assert "".join(pieces) == text
    assert all(content_size(piece) <= limit + 2 for piece in pieces)  # (+ the quotes)
    assert all(pieces) or pieces == [""]
    if " " in text:  # cut after a space, not inside a word
        assert all(piece.endswith(" ") for piece in pieces[:-1])


def test_an_item_is_set_aside_after_two_permanent_failures_in_a_row() -> None:
    attempts = Attempts()
    assert attempts.set_aside(MTooLarge(413, "too large")) is None  # tried once more
    assert attempts.set_aside(MatrixConnectionError("down")) is None  # a transient one between
    assert attempts.set_aside(MTooLarge(413, "too large")) is None  # counts from 1 again
    assert attempts.set_aside(MTooLarge(413, "too large")) == "M_TOO_LARGE"


@pytest.mark.parametrize(
    ("content", "index"),
    [
        ({"org.kalandra.set_aside": {"log_index": 7, "reason": "M_FORBIDDEN"}}, 7),
        ({"org.kalandra.set_aside": {"log_index": 7}, "ciphertext": "..."}, 7),  # encrypted
        ({"org.kalandra.set_aside": {"log_index": "7"}}, None),
        ({"org.kalandra.set_aside": 7}, None),
        ({"org.kalandra.log_index": 7}, None),  # a bridged message, not a notice
        ({}, None),
    ],
)
def test_the_log_index_a_set_aside_notice_stands_for(
    content: dict[str, object], index: int | None
) -> None:
    assert notice_for(content) == index


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise exc from inner
    except BaseException as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "unexplained"),
    [
        (KeyError("body"), True),  # a conversion of ours raising on some content
        (ValueError("bad"), True),
        (EncryptionError("no session"), True),
        (_caused(EncryptionError("no keys"), MatrixConnectionError("down")), False),
        (_caused(RuntimeError("wrapped"), sqlite3.OperationalError("locked")), False),
        (MatrixConnectionError("down"), False),
        (MatrixStandardRequestError(502, "bad gateway"), False),
        (aiohttp.ClientConnectionError(), False),
        (TimeoutError(), False),
        (OSError("reset"), False),
        (ClientError("no answer", 0), False),
    ],
)
def test_which_failures_waiting_cannot_explain(exc: BaseException, unexplained: bool) -> None:
    assert set_aside.unexplained(exc) is unexplained


def test_an_error_of_the_bridges_own_is_set_aside_after_its_attempts() -> None:
    """Retried forever, it would stall the portal's queue toward Matrix behind that item."""
    attempts = Attempts()
    for _ in range(set_aside.INTERNAL_ATTEMPTS - 1):
        assert attempts.set_aside(KeyError("body")) is None
    assert attempts.set_aside(KeyError("body")) == "internal error (KeyError)"


def test_a_transient_failure_between_restarts_the_count() -> None:
    attempts = Attempts()
    for _ in range(set_aside.INTERNAL_ATTEMPTS - 1):
        assert attempts.set_aside(ValueError("bad")) is None
    assert attempts.set_aside(MatrixConnectionError("down")) is None
    assert attempts.set_aside(ValueError("bad")) is None  # counts from 1 again
    for _ in range(100):  # the homeserver down for long: never set aside
        assert attempts.set_aside(MatrixConnectionError("down")) is None
