"""The self-update budget (post-compromise security)."""

from __future__ import annotations

import pytest

from kalandra_core.mls.update_tracker import UpdatePolicy, UpdateTracker


def test_message_budget() -> None:
    t = UpdateTracker(UpdatePolicy.HIGH, now=0)
    for _ in range(9):
        t.message_sent()
    assert not t.due(now=1)
    t.message_sent()
    assert t.due(now=1)
    t.leaf_updated(now=2)
    assert not t.due(now=2)


def test_time_budget_and_profiles() -> None:
    t = UpdateTracker(UpdatePolicy.named("standard"), now=1000)
    assert not t.due(now=1000 + 24 * 3600 - 1)
    assert t.due(now=1000 + 24 * 3600)
    assert UpdatePolicy.named("high") == UpdatePolicy(10, 3600)
    with pytest.raises(ValueError, match="unknown update profile"):
        UpdatePolicy.named("paranoid")
    with pytest.raises(ValueError, match="at least 1 message"):
        UpdatePolicy(0, 10)


def test_state_round_trip() -> None:
    t = UpdateTracker(UpdatePolicy.HIGH, now=5)
    for _ in range(4):
        t.message_sent()
    back = UpdateTracker.from_state(UpdatePolicy.HIGH, t.to_state())
    for _ in range(6):
        back.message_sent()
    assert back.due(now=6)
