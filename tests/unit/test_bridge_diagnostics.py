"""The SIGUSR1 task dump: each task's await chain, outermost first, code locations only."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from bridge import diagnostics


async def _inner(gate: asyncio.Event) -> None:
    await gate.wait()


async def _outer(gate: asyncio.Event, secret: str) -> None:
    await _inner(gate)
    del secret


@pytest.mark.asyncio
async def test_await_chain_names_every_suspended_frame() -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer(gate, "hunter2"), name="stuck-queue")
    await asyncio.sleep(0)
    chain = diagnostics.await_chain(task.get_coro())
    names = [step.split(" ")[0] for step in chain]
    assert names[:3] == ["_outer", "_inner", "Event.wait"]
    assert chain[-1].startswith("awaiting Future")  # FutureIter for the C future
    assert all("test_bridge_diagnostics.py" in step for step in chain[:2])
    gate.set()
    await task


@pytest.mark.asyncio
async def test_sigusr1_logs_the_tasks_without_their_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = asyncio.Event()
    task = asyncio.create_task(_outer(gate, "hunter2"), name="stuck-queue")
    diagnostics.install()
    try:
        with caplog.at_level(logging.WARNING, logger="kalandra.bridge.diagnostics"):
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.sleep(0.1)
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        gate.set()
        await task
    dump = "\n".join(record.getMessage() for record in caplog.records)
    assert "- stuck-queue" in dump
    assert "_outer" in dump
    assert "_inner" in dump
    assert "hunter2" not in dump
