"""The start-up ping check (bridge/appservice/self_ping.py): a homeserver that reached the bridge
but
answered its ping with an error (Synapse's 502 "AlreadyCalled" race) does not hold the start
back; one that did not reach it is asked again every second, then the error stands.

The homeserver's side is a real HTTP server on a socket that calls the appservice's ping
route, as Synapse does, and then answers 502 (Synapse's race cannot be produced on demand)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from mautrix.errors import MatrixRequestError

from bridge.appservice.self_ping import Pings, ping_self


async def appservice_with_pings() -> tuple[web.AppRunner, Pings, int]:
    pings = Pings()
    app = web.Application(middlewares=[pings.middleware])

    async def ping(_request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post("/_matrix/app/v1/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, pings, port


@pytest.mark.asyncio
async def test_a_ping_that_arrived_is_success_whatever_the_homeserver_answers() -> None:
    runner, pings, port = await appservice_with_pings()
    calls = 0

    async def homeserver(txn_id: str) -> int:
        nonlocal calls
        calls += 1
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/_matrix/app/v1/ping"
            async with http.post(url, json={"transaction_id": txn_id}) as resp:
                assert resp.status == 200
        raise MatrixRequestError(502, "AlreadyCalled: Tried to cancel an already-called event")

    try:
        assert await ping_self(homeserver, pings.received, "txn-1", pause=0.01) == -1
    finally:
        await runner.cleanup()
    assert calls == 1
    assert pings.received == {"txn-1"}


@pytest.mark.asyncio
async def test_a_ping_that_never_arrived_is_asked_again_then_fails() -> None:
    calls = 0

    async def homeserver(_txn_id: str) -> int:
        nonlocal calls
        calls += 1
        raise MatrixRequestError(502, "M_CONNECTION_FAILED")

    with pytest.raises(MatrixRequestError):
        await ping_self(homeserver, set(), "txn-2", attempts=3, pause=0.01)
    assert calls == 3


@pytest.mark.asyncio
async def test_a_homeserver_that_comes_back_is_answered_at_once() -> None:
    answers: list[MatrixRequestError | int] = [MatrixRequestError(502, "M_CONNECTION_FAILED"), 7]

    async def homeserver(_txn_id: str) -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await ping_self(homeserver, set(), "txn-3", pause=0.01) == 7
