"""The client's send window (sans-IO): bounded frames and bytes in flight, RATE_LIMITED pauses
with a restart from one frame; and the core's use of it for requests outside its outbox."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from kalandra_core.client.core import ClientCore
from kalandra_core.client.window import SendWindow
from kalandra_core.proto import ErrorCode, ErrorPayload, Frame, FrameHeader, Opcode


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


NOW = 1_700_000_000.0


def _rate_limited(retry_after: int) -> Frame:
    error = ErrorPayload(code=int(ErrorCode.RATE_LIMITED), message="", retry_after=retry_after)
    return Frame.build(FrameHeader(Opcode.ERROR, request_id=1), error)


def test_requests_outside_the_outbox_share_the_cores_window() -> None:
    """Media blocks take their place in the core's window with reserve/release; the core's
    clock is the ``now`` each call passes (a RATE_LIMITED pause ends at now + retry_after)."""
    core = ClientCore(1, bytes(SigningKey.generate()), window=2, window_bytes=1000)
    assert not core.reserve(10, now=NOW)  # not connected
    assert core.resync_all(now=NOW) == []
    assert core.reserve(10, now=NOW)
    assert core.reserve(10, now=NOW)
    assert not core.reserve(10, now=NOW)  # two in flight: full
    assert core.release(10, now=NOW) == []
    assert core.reserve(10, now=NOW)
    core.release(10, now=NOW)
    core.release(10, now=NOW)

    assert core.receive(_rate_limited(2), now=NOW) != []  # a Failed event (no request of ours)
    assert core.resume_at(now=NOW + 1) == NOW + 2
    assert not core.reserve(10, now=NOW + 1)  # paused
    assert core.resume_at(now=NOW + 2) is None
    assert core.reserve(10, now=NOW + 2)
    assert not core.reserve(10, now=NOW + 2)  # restarting from one frame in flight
