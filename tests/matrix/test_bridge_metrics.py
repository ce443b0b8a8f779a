"""The bridge's operations surface against a real Synapse: Prometheus metrics scraped over HTTP
after real traffic in both directions (and a refused message), and the readiness probe, which
answers 200 only once the homeserver connection, the Kalandra server and the bot are up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from nio import RoomMessageNotice
from prometheus_client.parser import text_string_to_metric_families

from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    BridgeStack,
    bridge_stack,
    ghost_of,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    run_bridge,
    say,
    sync_until,
    tail,
    wait_history,
)
from matrix.synapse import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, metrics_port: int
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("metrics"),
        "sqlite",
        others=("relay",),
        options={"metrics.enabled": True, "metrics.listen_port": metrics_port},
    ) as stack:
        yield stack


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_metric(port: int, name: str, at_least: float, **labels: str) -> Samples:
    async with asyncio.timeout(60):
        while value(samples := await scrape(port), name, **labels) < at_least:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    return samples


@pytest.mark.asyncio(loop_scope="module")
async def test_metrics_move_with_traffic(stack: BridgeStack, metrics_port: int) -> None:
    before = await scrape(metrics_port)
    for direction in ("to_matrix", "to_kalandra"):
        assert ("kalandra_bridge_queue_depth", (("direction", direction),)) in before
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "measured")
        room_id = bytes.fromhex(room_hex)
        for i in range(3):
            await native.send_text(room_id, f"native {i}")
        await wait_history(alice, portal, ghost_of(native), 3)
        for i in range(2):
            await say(alice, portal, f"matrix {i}")
        received: list[Message] = []
        async with asyncio.timeout(60):
            while len(received) < 2:
                received.append(await native.messages.get())

        # A relay user speaks without relay mode: refused, counted by reason.
        async with nio_client(stack.synapse, stack.others["relay"]) as relay:
            await alice.room_invite(portal, relay.user_id)
            await sync_until(relay, lambda: portal in relay.invited_rooms, "the invite")
            await relay.join(portal)
            await say(relay, portal, "not allowed")

            async def refused() -> bool:
                return any(
                    isinstance(e, RoomMessageNotice) and e.body.startswith("Not bridged")
                    for e in await room_history(alice, portal)
                )

            async with asyncio.timeout(60):
                while not await refused():  # noqa: ASYNC110
                    await asyncio.sleep(0.5)

    def moved(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    after = await wait_metric(
        metrics_port,
        "kalandra_bridge_messages_total",
        value(before, "kalandra_bridge_messages_total", direction="to_kalandra") + 2,
        direction="to_kalandra",
    )
    refusal = {"direction": "to_kalandra", "reason": "m.no_permission"}
    after = await wait_metric(
        metrics_port,
        "kalandra_bridge_failures_total",
        value(before, "kalandra_bridge_failures_total", **refusal) + 1,
        **refusal,
    )
    assert moved(after, "kalandra_bridge_messages_total", direction="to_matrix") >= 3
    assert moved(after, "kalandra_bridge_messages_total", direction="to_kalandra") >= 2
    for direction, count in (("to_matrix", 3), ("to_kalandra", 2)):
        observed = moved(after, "kalandra_bridge_latency_seconds_count", direction=direction)
        assert observed >= count, direction
        assert moved(after, "kalandra_bridge_latency_seconds_sum", direction=direction) > 0
    # Adding the native member and alice's puppet leaf: commits, mirrored as epochs.
    assert moved(after, "kalandra_bridge_epoch_changes_total") >= 2
    assert moved(after, "kalandra_bridge_appservice_transactions_total", status="200") >= 3
    # The portal's room was made by this bridge process: no earlier process can have sent its
    # messages, so none is looked for in Matrix before its send (a homeserver request each).
    assert moved(after, "kalandra_bridge_resend_lookups_total") == 0
    await native.close()


async def probe(port: int, path: str) -> tuple[int, dict[str, object]] | None:
    """The probe's answer, None while nothing listens."""
    url = f"http://127.0.0.1:{port}/_matrix/mau/{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(url) as response,
        ):
            return response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError):
        return None


async def assert_ready(port: int) -> None:
    """200 and ready; how many of the bot's rooms still catch up is a count (any: they do so
    behind new work)."""
    status, body = await probe(port, "ready") or (0, {})
    assert status == 200, body
    assert body.keys() == {"ready", "rooms_catching_up"}, body
    assert body["ready"] is True
    catching_up = body["rooms_catching_up"]
    assert isinstance(catching_up, int), body
    assert catching_up >= 0, body


@pytest.mark.asyncio(loop_scope="module")
async def test_ready_waits_for_the_homeserver(stack: BridgeStack, metrics_port: int) -> None:
    await assert_ready(stack.as_port)
    # SIGKILL: a SIGTERM landing while mautrix handles a request ends in a KeyboardInterrupt
    # traceback (its signal handling), and the bridge is built to survive a kill.
    await stack.kill9()
    await stack.synapse.stop()
    # Started without its homeserver (its own log: mautrix logs the failed connection),
    # the bridge listens and is alive, but not ready.
    log = stack.work / "bridge-no-homeserver.log"
    bridge = run_bridge("-c", str(stack.config), cwd=stack.work, log=log)
    try:
        async with asyncio.timeout(60):
            while (answer := await probe(stack.as_port, "ready")) is None:
                assert bridge.poll() is None, tail(log)
                await asyncio.sleep(0.2)
        assert answer[0] == 503, answer
        waiting = answer[1]["waiting_for"]
        assert isinstance(waiting, list)
        assert "homeserver" in waiting, answer
        assert (await probe(stack.as_port, "live") or (0,))[0] == 200
    finally:
        bridge.terminate()
        try:
            await asyncio.to_thread(bridge.wait, 30)
        except Exception:
            bridge.kill()
            await asyncio.to_thread(bridge.wait, 15)
    await stack.synapse.restart()
    await stack.restart()
    await assert_ready(stack.as_port)
    # The metrics listener is back too (a new process: counters start over).
    samples = await scrape(metrics_port)
    assert ("kalandra_bridge_queue_depth", (("direction", "to_matrix"),)) in samples
    # Not a check: the teardown's SIGTERM must not land while the bridge is still answering
    # (mautrix's signal handling turns that into a KeyboardInterrupt traceback).
    await asyncio.sleep(1)
