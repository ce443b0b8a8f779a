"""Pacing of the outbox on one connection: how much may be in flight, and when sending resumes.

The server answers every frame of ours (the sequenced echo, an Error, a Welcome receipt), so a
frame is in flight from its transmission until that answer or the loss of the connection.
Keeping a bounded number (and size) in flight lets a burst of sends go out as the answers come
back, rather than all at once into the server's per-session rate limit and send buffer.

RATE_LIMITED pauses all sending until its ``retry_after`` has passed (the limit is per session,
so any frame sent meanwhile would be refused too). Sending then restarts with a window of one
frame that grows by one with every answer, as TCP's slow start does: the refused frames go out
again first, in order, and the next refusal finds few frames behind it.

Sans-IO: the caller passes the clock in.
"""

from __future__ import annotations

DEFAULT_FRAMES = 32  # well under the default burst of a server session (400)
DEFAULT_BYTES = 6 * 1024 * 1024  # under a transport's default send buffer (8 MiB)


class SendWindow:
    __slots__ = ("bytes", "frames", "limit", "max_bytes", "max_frames", "not_before")

    def __init__(self, max_frames: int = DEFAULT_FRAMES, max_bytes: int = DEFAULT_BYTES) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("a send window takes at least one frame and one byte")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.limit = max_frames  # the window now (smaller while restarting after a pause)
        self.frames = 0  # in flight
        self.bytes = 0
        self.not_before = 0.0  # clock time before which nothing is sent (RATE_LIMITED)

    def paused(self, now: float) -> bool:
        return now < self.not_before

    def admits(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes may go out now (one frame always may, whatever its
        size, on an otherwise idle window)."""
        if self.frames >= self.limit:
            return False
        return self.frames == 0 or self.bytes + size <= self.max_bytes

    def sent(self, size: int) -> None:
        self.frames += 1
        self.bytes += size

    def answered(self, size: int, *, refused: bool = False) -> None:
        """A frame of ours in flight got its answer (``refused``: RATE_LIMITED)."""
        self.frames = max(0, self.frames - 1)
        self.bytes = max(0, self.bytes - size)
        if not refused and self.limit < self.max_frames:
            self.limit += 1

    def rate_limited(self, now: float, retry_after: float) -> None:
        self.not_before = max(self.not_before, now + max(retry_after, 0.0))
        self.limit = 1

    def reset(self) -> None:
        """A new connection: nothing in flight, and a new session's full allowance."""
        self.frames = 0
        self.bytes = 0
        self.limit = self.max_frames
        self.not_before = 0.0
