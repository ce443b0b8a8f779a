"""What every task of the process is waiting on, logged on SIGUSR1.

A bridge that stops moving without an error (a queue waiting on a future nobody will complete)
leaves nothing in its log; `kill -USR1 <pid>` writes each asyncio task's await chain (function,
file and line of every suspended frame, and the future at the bottom) at WARNING. Only code
locations are written: never arguments or locals, which could hold message content or keys.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger("kalandra.bridge.diagnostics")


def install(loop: asyncio.AbstractEventLoop | None = None) -> None:
    loop = loop or asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / no signals
        log.debug("SIGUSR1 task dump not available here")


def dump_tasks() -> None:
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"{len(tasks)} tasks:"]
    for task in tasks:
        lines.append(f"- {task.get_name()}")
        lines.extend(f"    {step}" for step in await_chain(task.get_coro()))
    log.warning("\n".join(lines))


def await_chain(coro: object) -> list[str]:
    """Where ``coro`` is suspended: one line per awaiting frame, outermost first."""
    steps: list[str] = []
    seen = 0
    while coro is not None and seen < 64:
        seen += 1
        frame = _frame_of(coro)
        if frame is None:  # a future, or an object awaited through __await__
            steps.append(f"awaiting {type(coro).__name__}")
            break
        code = frame.f_code
        steps.append(f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})")
        coro = _awaited_by(coro)
    return steps


def _awaited_by(obj: object) -> object:
    for name in ("cr_await", "gi_yieldfrom", "ag_await"):
        inner = getattr(obj, name, None)
        if inner is not None:
            return inner
    return None


def _frame_of(obj: object) -> FrameType | None:
    """The suspended frame of a coroutine, generator or async generator (None otherwise)."""
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        frame: Any = getattr(obj, name, None)
        if isinstance(frame, FrameType):
            return frame
    return None
