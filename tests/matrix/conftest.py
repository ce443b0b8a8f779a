"""Fixtures for tests against a real Synapse (installed by tests/matrix/install_synapse.sh).

`synapse` starts one throwaway Synapse for the whole test session, on a fresh SQLite database,
with the appservice registrations of `synapse_registrations` (override that fixture to add the
bridge's). The Synapse is loop-independent, so function-scoped async tests can use it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from matrix.synapse import SYNAPSE_PYTHON, Synapse, free_port, start_synapse, write_registration


@dataclass(frozen=True)
class StackAppservice:
    """The registration of the stack test's own minimal appservice (test_synapse_stack.py)."""

    registration: Path
    appservice_id: str
    port: int
    as_token: str
    hs_token: str
    sender_localpart: str
    user_prefix: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def stack_appservice(tmp_path_factory: pytest.TempPathFactory) -> StackAppservice:
    port = free_port()
    appservice = StackAppservice(
        registration=tmp_path_factory.mktemp("appservice") / "stack-registration.yaml",
        appservice_id="stack-test",
        port=port,
        as_token=f"as_{secrets.token_hex(16)}",
        hs_token=f"hs_{secrets.token_hex(16)}",
        sender_localpart="kalandrabot",
        user_prefix="stackas_",
    )
    write_registration(
        appservice.registration,
        url=appservice.url,
        as_token=appservice.as_token,
        hs_token=appservice.hs_token,
        sender_localpart=appservice.sender_localpart,
        user_regex=f"@{appservice.user_prefix}.*:localhost",
        alias_regex=f"#{appservice.user_prefix}.*:localhost",
        appservice_id=appservice.appservice_id,
    )
    return appservice


@pytest.fixture(scope="session")
def synapse_registrations(stack_appservice: StackAppservice) -> list[Path]:
    """Appservice registrations the session's Synapse loads at start."""
    return [stack_appservice.registration]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def synapse(
    tmp_path_factory: pytest.TempPathFactory, synapse_registrations: list[Path]
) -> AsyncIterator[Synapse]:
    if not SYNAPSE_PYTHON.exists():
        pytest.fail(
            f"Synapse is not installed ({SYNAPSE_PYTHON} is missing). "
            "Run `bash tests/matrix/install_synapse.sh` (`make test` runs it).",
            pytrace=False,
        )
    homeserver = await start_synapse(
        tmp_path_factory.mktemp("synapse"), registrations=synapse_registrations
    )
    try:
        yield homeserver
    finally:
        await homeserver.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that ran on a bridge stack shows the end of the bridge's log: a failure
    seen once in CI (a timeout, say) is then explained by what the bridge did meanwhile."""
    report = yield
    if not report.failed:
        return report
    for name, value in getattr(item, "funcargs", {}).items():
        log = getattr(value, "log", None)  # a BridgeStack's
        if isinstance(log, Path) and log.name == "bridge.log" and log.exists():
            text = log.read_text(errors="replace")[-12000:]
            report.sections.append((f"bridge log of {name} (end)", text))
    return report
