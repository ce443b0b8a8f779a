"""Trying again after a failure that may pass (a busy database, a homeserver restarting, a lost
connection): the one backoff every retry loop of the service uses.

:class:`Backoff` gives the pauses (``first`` seconds, doubled after each up to ``cap``, spread by
``jitter``); :func:`retrying` is the common loop around it: an operation tried until it works,
each failure logged (its type only: an error's text may quote content).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    def __init__(self, first: float = 0.5, cap: float = 30.0, jitter: float = 0.0) -> None:
        if not 0 < first <= cap or not 0 <= jitter < 1:
            raise ValueError("a backoff needs 0 < first <= cap and 0 <= jitter < 1")
        self.first, self.cap, self.jitter = first, cap, jitter
        self._delay = first

    def next(self) -> float:
        """The pause now due; the one after it is twice as long (up to ``cap``)."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return delay

    async def pause(self) -> None:
        await asyncio.sleep(self.next())

    def reset(self) -> None:
        """After a success: the next failure starts from ``first`` again."""
        self._delay = self.first


async def retrying(
    operation: Callable[[], Awaitable[T]],
    what: str,
    log: logging.Logger,
    *,
    first: float = 0.5,
    cap: float = 30.0,
) -> T:
    """``operation()``, tried until it returns; each failure logged (``what`` ... "not done
    yet") and followed by a pause. Cancellation ends it."""
    backoff = Backoff(first, cap)
    while True:
        try:
            return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s not done yet (%s); retrying", what, type(exc).__name__)
        await backoff.pause()
