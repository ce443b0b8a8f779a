"""Rate limits per session: a token bucket (a sustained rate with a burst allowance), and a
budget that keeps the promise of the retry_after it answered."""

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


class Budget:
    """A bucket whose refusals last their whole retry_after: requests already on their way
    behind a refused one are refused too, so a client that sends them again in order keeps
    its order."""

    __slots__ = ("_bucket", "_limited_until")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self._limited_until = 0.0

    def admit(self, now: float) -> int | None:
        """None if the request may go on, else its retry_after (whole seconds)."""
        if now < self._limited_until:
            wait = self._limited_until - now
        else:
            wait = self._bucket.take(now)
            if wait <= 0:
                return None
        retry_after = TokenBucket.retry_after_seconds(wait)
        self._limited_until = max(self._limited_until, now + retry_after)
        return retry_after
