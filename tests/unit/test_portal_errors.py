"""The portal queue's decision after a failed try (bridge/portal/errors.py), without a bridge:
each kind of error a Matrix event's work can meet, as the real components raise it."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest
from matrix.synapse import free_port
from mautrix.types import MessageStatusReason

from bridge.members.bridged_users import SendFailed
from bridge.portal.errors import (
    ATTEMPTS,
    TRANSIENT_ATTEMPTS,
    Fail,
    Hold,
    Queued,
    Retry,
    WaitOut,
    verdict,
)
from bridge.portal.relations import Held
from bridge.portal.statuses import Refused
from kalandra_core.client.driver import ClientError, NotYetConfirmed
from kalandra_core.proto.payloads import ErrorCode


def test_a_refusal_fails_with_its_own_reason_at_once() -> None:
    refusal = Refused(MessageStatusReason.UNSUPPORTED, "stickers are not supported")
    decision = verdict(refusal, 1)
    assert decision == Fail(refusal)


def test_a_held_relation_is_held_and_a_queued_send_is_not_sent_again() -> None:
    assert verdict(Held(), 1) == Hold()
    assert verdict(NotYetConfirmed("queued", 0), 1) == Queued()


@pytest.mark.parametrize(
    "error",
    [
        SendFailed("not connected"),  # no answer at all (code 0)
        ClientError("storage", int(ErrorCode.STORAGE_ERROR)),
        ClientError("slow down", int(ErrorCode.RATE_LIMITED)),
    ],
)
def test_not_now_answers_are_retried_then_fail_retriable(error: Exception) -> None:
    assert all(verdict(error, n) == Retry() for n in range(1, TRANSIENT_ATTEMPTS))
    last = verdict(error, TRANSIENT_ATTEMPTS)
    assert isinstance(last, Fail)
    assert last.refusal.reason == MessageStatusReason.NETWORK_ERROR
    assert last.refusal.retriable
    assert "did not take it in time" in str(last.refusal)


def test_a_refusal_of_the_kalandra_server_fails_at_once_not_retriable() -> None:
    error = ClientError("not a member of the room", int(ErrorCode.NOT_AUTHORIZED))
    decision = verdict(error, 1)
    assert isinstance(decision, Fail)
    assert decision.refusal.reason == MessageStatusReason.NETWORK_ERROR
    assert not decision.refusal.retriable
    assert "refused it (not a member of the room)" in str(decision.refusal)


@pytest.mark.asyncio
async def test_the_bridge_database_gone_is_waited_out_whatever_the_attempt() -> None:
    try:  # a real connection to a PostgreSQL that is not there
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=5)
    except Exception as exc:
        gone = exc
    else:
        pytest.fail("nothing listens on a free port")
    assert verdict(gone, 1) == WaitOut()
    assert verdict(gone, 100) == WaitOut()


def test_other_errors_are_retried_a_few_times_then_fail_as_internal() -> None:
    error = KeyError("a bug of ours")
    assert all(verdict(error, n) == Retry() for n in range(1, ATTEMPTS))
    last = verdict(error, ATTEMPTS)
    assert isinstance(last, Fail)
    assert last.refusal.reason == MessageStatusReason.GENERIC_ERROR
    assert last.refusal.retriable
    assert str(last.refusal) == "an internal error (KeyError)."
