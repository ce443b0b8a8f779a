"""Waiting for a bridge process to be ready (`make run`, the tests and the bridge benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess

import aiohttp


async def wait_bridge_ready(
    proc: subprocess.Popen[bytes], port: int, within: float, interval: float = 0.2
) -> bool:
    """Poll the appservice's ``/_matrix/mau/ready`` until it answers 200 (True) or the process
    exits (False); TimeoutError after ``within`` seconds."""
    url = f"http://127.0.0.1:{port}/_matrix/mau/ready"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async with asyncio.timeout(within):
            while proc.poll() is None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return True
                await asyncio.sleep(interval)
    return False
