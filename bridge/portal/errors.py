"""What a portal's queue toward Kalandra does when handling a Matrix event raised: the one
decision, as a pure function of the error and the attempt (to_kalandra.py acts on it).

* :class:`Fail`: the event will not reach Kalandra; its sender reads why (status event and
  notice). A Kalandra server that never answered, or kept saying "retry", is a retriable
  failure (sent again later it may pass); a refusal is not.
* :class:`Retry`: try the same work again after a pause (a lost answer, the server's database
  restarting, a rate limit; any other error a few times).
* :class:`Hold`: a relation waits for its target's room key (e2ee.hold), recorded as held.
* :class:`Queued`: the bot's client has it queued and will deliver it once: never again here.
* :class:`WaitOut`: the bridge's own database is down: the whole work is waited out and redone.
"""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.types import MessageStatusReason

from kalandra_core.client.driver import ClientError, NotYetConfirmed
from kalandra_core.proto.payloads import ErrorCode
from kalandra_core.storage.reachable import outage

from ..members.bridged_users import SendFailed
from .relations import Held
from .statuses import Refused

# Answers of the Kalandra server that mean "not now": no answer at all, its storage failing
# (a database restart: the frame was not sequenced), over the session's rate. Retried for
# about two and a half minutes before the message is reported as failed.
TRANSIENT = frozenset({0, int(ErrorCode.STORAGE_ERROR), int(ErrorCode.RATE_LIMITED)})
TRANSIENT_ATTEMPTS = 14
ATTEMPTS = 5  # for other failures that may pass (a lost connection, a busy database)


@dataclass(frozen=True, slots=True)
class Fail:
    refusal: Refused


@dataclass(frozen=True, slots=True)
class Retry:
    pass


@dataclass(frozen=True, slots=True)
class Hold:
    pass


@dataclass(frozen=True, slots=True)
class Queued:
    pass


@dataclass(frozen=True, slots=True)
class WaitOut:
    pass


Verdict = Fail | Retry | Hold | Queued | WaitOut


def verdict(exc: Exception, attempt: int) -> Verdict:
    """What to do after ``exc`` ended the ``attempt``-th try (counted from 1)."""
    if isinstance(exc, Refused):
        return Fail(exc)
    if isinstance(exc, Held):
        return Hold()
    if isinstance(exc, NotYetConfirmed):
        return Queued()
    if isinstance(exc, SendFailed | ClientError):
        transient = exc.code in TRANSIENT
        if transient and attempt < TRANSIENT_ATTEMPTS:
            return Retry()
        # The Kalandra server's answer: say it as it is.
        if transient:  # still no answer, or still "retry": maybe later
            text = f"the Kalandra server did not take it in time ({exc})."
        else:
            text = f"the Kalandra server refused it ({exc})."
        return Fail(Refused(MessageStatusReason.NETWORK_ERROR, text, retriable=transient))
    if outage(exc):
        return WaitOut()
    if attempt >= ATTEMPTS:
        text = f"an internal error ({type(exc).__name__})."
        return Fail(Refused(MessageStatusReason.GENERIC_ERROR, text, retriable=True))
    return Retry()
