"""``make run`` keeps the bridge running next to Synapse.

What a newcomer expects of a local stack: Ctrl-C (or SIGTERM) stops both, in order, and exits
with status 0; the bridge stopping or crashing on its own does not take Synapse down. The
supervisor says what happened (status or signal, the log's last lines) and starts the bridge
again, after 1 s, doubling up to a minute while it keeps dying soon after starting. Stopping
the bridge by hand (``kill $(cat DATA/bridge.pid)``) is therefore how to restart the bridge
alone, e.g. after changing its code: Synapse and its sessions stay.

The children run in their own sessions: a Ctrl-C in the terminal reaches ``make`` and this
process only, which then stop the bridge before Synapse (otherwise the bridge would see
Synapse vanish in the middle of its own shutdown, and its exit would look like a crash). They
also get SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from kalandra_core.backoff import Backoff

from .ready import wait_bridge_ready
from .synapse import Synapse, die_with_parent

FIRST_DELAY = 1.0  # seconds before starting a bridge that exited; doubled while it keeps dying
MAX_DELAY = 60.0
STEADY = 30.0  # a bridge that ran this long (seconds) is restarted after FIRST_DELAY again
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
POLL = 0.5


def exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


class BridgeSupervisor:
    """Runs ``command`` (the bridge) in ``cwd``, its output appended to ``log`` and its pid in
    ``pid_file``, until ``stop`` is set; restarts it whenever it exits by itself."""

    def __init__(
        self,
        command: list[str],
        cwd: Path,
        log: Path,
        pid_file: Path,
        port: int,
        synapse: Synapse,
        stop: asyncio.Event,
    ) -> None:
        self.command, self.cwd, self.log, self.pid_file = command, cwd, log, pid_file
        self.port = port
        self.synapse = synapse
        self.stop = stop  # set by Ctrl-C / SIGTERM
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def restart_hint(self) -> str:
        return f"kill $(cat {self.pid_file})"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc

    async def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Until the bridge is ready (True), exits or is asked to stop (False)."""
        ready = asyncio.create_task(wait_bridge_ready(proc, self.port, READY_TIMEOUT, 0.3))
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, ready):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if ready.cancelled():
            return False
        if isinstance(ready.exception(), TimeoutError):
            print(
                f"the bridge is not ready after {READY_TIMEOUT:.0f} s; see {self.log}",
                file=sys.stderr,
                flush=True,
            )
            return False
        return bool(ready.result())

    async def _until_exit(self, proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None and not self.stop.is_set() and self.synapse.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), POLL)

    async def run(self, on_first_ready: Callable[[], Awaitable[None]]) -> int:
        """Supervise until ``stop`` (0) or until Synapse exits (1)."""
        loop = asyncio.get_running_loop()
        backoff, announced = Backoff(FIRST_DELAY, MAX_DELAY), False
        try:
            while not self.stop.is_set():
                started = loop.time()
                self.proc = proc = self._spawn()
                if await self._ready(proc):
                    if not announced:
                        await on_first_ready()
                        announced = True
                    else:
                        print(f"the bridge is running again (pid {proc.pid})", flush=True)
                await self._until_exit(proc)
                if self.stop.is_set():
                    return 0
                if not self.synapse.running:
                    print(
                        f"Synapse stopped; see {self.synapse.log_path}. Stopping the bridge;"
                        " run `make run` again to start both.",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                code = proc.returncode
                assert code is not None
                if loop.time() - started >= STEADY:
                    backoff.reset()
                delay = backoff.next()
                # A stop (status 0, SIGTERM: someone restarting it) needs no log; a crash does.
                stopped = code in (0, -signal.SIGTERM)
                print(
                    f"the bridge {exit_description(code)}; Synapse keeps running."
                    + ("" if stopped else f" The end of {self.log}:\n{log_tail(self.log)}")
                    + f"\nstarting the bridge again in {delay:.0f} s (Ctrl-C stops everything;"
                    f" `{self.restart_hint}` restarts the bridge alone)",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
            return 0
        finally:
            await self.terminate()

    async def terminate(self) -> None:
        """Stop the bridge (SIGTERM, then SIGKILL after STOP_TIMEOUT s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self.pid_file.unlink(missing_ok=True)
