"""An asyncio event loop on virtual time, for deterministic simulation.

``VirtualTimeLoop`` is a ``SelectorEventLoop`` whose ``time()`` is a number we advance ourselves.
Its selector never waits: when the loop has nothing ready and asks the selector to wait
``timeout`` seconds for I/O until its next timer, the selector moves the virtual clock forward by
``timeout`` and returns at once. So ``asyncio.sleep``, ``wait_for`` and every timer fire in
virtual time, instantly and always in the same order. No real I/O happens in a simulation (the
only registered file is the loop's own self-pipe, still polled without blocking, so
``call_soon_threadsafe`` keeps working).

Work handed to an executor (``run_in_executor``: the server verifies large batches of
signatures in a thread pool) runs at once, inline: a thread would finish at a real time, so
the virtual time its result is seen at would differ from run to run.

When nothing is ready and no timer is set, a real program would wait forever: the selector
raises :class:`SimulationDeadlock` instead (after a short real-time grace for stray threads).

The code under test reads time only through what it is given: ``loop.time`` (virtual
monotonic) and ``loop.wall`` (virtual Unix time) are what a simulation passes to the real
server's and client's clock hooks.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Virtual wall-clock time at virtual monotonic 0: 2023-11-14T22:13:20Z (HLC needs a real-ish date).
WALL_EPOCH = 1_700_000_000.0
_REAL_GRACE = 2.0


class SimulationDeadlock(RuntimeError):
    """Every task waits and no timer is due: the simulated program would hang forever."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.steps = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.steps += 1
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready:
            return ready
        if timeout is None:
            ready = super().select(_REAL_GRACE)
            if not ready:
                raise SimulationDeadlock("no task can make progress and no timer is set")
            return ready
        if timeout > 0:
            self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._vselector = _VirtualSelector()
        super().__init__(self._vselector)

    def time(self) -> float:
        return self._vselector.now

    def wall(self) -> float:
        """Virtual Unix time (seconds)."""
        return WALL_EPOCH + self._vselector.now

    @property
    def steps(self) -> int:
        return self._vselector.steps

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh virtual-time loop, then cancel what is left."""
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
