"""The bridge-wide budget of PENDING message statuses (bridge/portal/statuses.py): a burst,
then a steady rate, so that a bridge where everything waits does not send the homeserver a
PENDING (and a SUCCESS after it) for every message."""

from __future__ import annotations

from bridge.portal.statuses import PENDING_BURST, PENDING_RATE, pending_allowed
from bridge.run_state import RunState


def test_a_burst_then_the_rate() -> None:
    state = RunState()
    now = 1000.0
    assert all(pending_allowed(state, now) for _ in range(PENDING_BURST))
    assert not pending_allowed(state, now)  # over the budget: skipped
    assert not pending_allowed(state, now + 0.5 / PENDING_RATE)
    assert pending_allowed(state, now + 1.0 / PENDING_RATE)  # one more after its share of time
    assert not pending_allowed(state, now + 1.0 / PENDING_RATE)


def test_each_bridge_has_its_own_budget() -> None:
    first, second = RunState(), RunState()
    for _ in range(PENDING_BURST):
        assert pending_allowed(first, 0.0)
    assert not pending_allowed(first, 0.0)
    assert pending_allowed(second, 0.0)
