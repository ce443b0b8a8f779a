"""Token bucket per session: a sustained rate with a burst allowance."""

from __future__ import annotations

import math


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one is available."""
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate

    @staticmethod
    def retry_after_seconds(wait: float) -> int:
        return max(1, math.ceil(wait))
