"""The one backoff of the service's retry loops (kalandra_core/backoff.py)."""

from __future__ import annotations

import logging

import pytest

from kalandra_core.backoff import Backoff, retrying


def test_pauses_double_up_to_the_cap_and_start_over_after_a_reset() -> None:
    backoff = Backoff(first=0.5, cap=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_jitter_spreads_each_pause_within_its_fraction() -> None:
    backoff = Backoff(first=1.0, cap=1.0, jitter=0.25)
    pauses = [backoff.next() for _ in range(200)]
    assert all(0.75 <= p <= 1.25 for p in pauses)
    assert len(set(pauses)) > 1


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0), (2, 1, 0), (1, 1, 1.0)])
def test_a_backoff_that_would_not_back_off_is_refused(
    first: float, cap: float, jitter: float
) -> None:
    with pytest.raises(ValueError, match="a backoff needs"):
        Backoff(first, cap, jitter)


async def test_retrying_tries_until_it_works_and_logs_each_failure_by_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries: list[int] = []

    async def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionResetError("secret text of the error")
        return "done"

    log = logging.getLogger("test.backoff")
    with caplog.at_level(logging.WARNING, logger="test.backoff"):
        assert await retrying(flaky, "the flaky step", log, first=0.01, cap=0.02) == "done"
    assert len(tries) == 3
    assert caplog.messages == [
        "the flaky step not done yet (ConnectionResetError); retrying",
        "the flaky step not done yet (ConnectionResetError); retrying",
    ]
