"""mautrix's crypto log records the bridge demotes or shortens (bridge/log_noise.py), through
the real logging machinery."""

from __future__ import annotations

import logging

import pytest

from bridge import log_noise


@pytest.fixture
def installed() -> None:
    log_noise.install()


def test_a_key_share_to_a_device_gone_is_one_warning_without_traceback(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("mau.crypto.ghost")
    with caplog.at_level(logging.DEBUG, logger="mau.crypto.ghost"):
        try:
            raise Exception("Key claim response didn't contain key for queried device")
        except Exception:
            log.exception("Failed to create missing outbound sessions")
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert record.exc_info is None
    assert record.getMessage() == (
        "Failed to create missing outbound sessions (Exception: Key claim response didn't"
        " contain key for queried device)"
    )


def test_cross_signing_chatter_is_debug_and_other_errors_stay(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("mau.crypto")
    with caplog.at_level(logging.INFO, logger="mau.crypto"):
        log.warning("Didn't find cross-signing key of @someone:example.org")
        log.error("Something else went wrong")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "Something else went wrong")
    ]
