"""The client's send window (sans-IO): bounded frames and bytes in flight, RATE_LIMITED pauses
with a restart from one frame."""

from __future__ import annotations

import pytest

from kalandra_core.client.window import SendWindow


def test_frames_and_bytes_in_flight_are_bounded() -> None:
    window = SendWindow(max_frames=3, max_bytes=100)
    for _ in range(3):
        assert window.admits(10)
        window.sent(10)
    assert not window.admits(1)  # three frames in flight
    window.answered(10)
    assert window.admits(80)
    assert not window.admits(81)  # 20 + 81 bytes would pass the byte budget


def test_one_frame_of_any_size_goes_out_on_an_idle_window() -> None:
    window = SendWindow(max_frames=4, max_bytes=100)
    assert window.admits(10_000)
    window.sent(10_000)
    assert not window.admits(1)
    window.answered(10_000)
    assert window.admits(10_000)


def test_rate_limited_pauses_then_restarts_from_one_frame() -> None:
    window = SendWindow(max_frames=4)
    window.sent(10)
    window.sent(10)
    window.answered(10, refused=True)
    window.rate_limited(now=100.0, retry_after=2)
    window.answered(10, refused=True)
    window.rate_limited(now=100.1, retry_after=1)  # a later, shorter answer keeps the longer
    assert window.paused(101.9)
    assert not window.paused(102.0)
    assert window.admits(10)
    window.sent(10)
    assert not window.admits(10)  # the window is one frame now
    window.answered(10)
    for expected in (2, 3, 4, 4):  # it grows by one per answer, up to its size
        assert window.limit == expected
        window.sent(10)
        window.answered(10)


def test_a_new_connection_starts_afresh() -> None:
    window = SendWindow(max_frames=2)
    window.sent(10)
    window.rate_limited(now=5.0, retry_after=30)
    window.reset()
    assert not window.paused(5.0)
    assert window.frames == 0
    assert window.limit == 2


def test_a_window_needs_room_for_a_frame() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        SendWindow(max_frames=0)
