"""What the queue toward Matrix does with an item Matrix will never take: it is set aside, and
oversized text is split first so that it does not come to that.

A failure is transient (no connection, the homeserver's 5xx, M_LIMIT_EXCEEDED, a timeout, our
own database) or permanent (any other 4xx answer: M_FORBIDDEN for a banned ghost, M_TOO_LARGE,
M_BAD_JSON, ...). Transient ones are retried with backoff, in place. A permanent one is tried
once more (the retry rejoins the ghost, which mends a ghost kicked meanwhile); if it fails
permanently again, the item is set aside: the portal gets a notice from the bot naming the
sender's ghost, the log index, the time and the errcode, that notice stands for the message in
``bridge_messages`` (so a restart neither retries it nor loses the record), and the queue goes
on. An unknown token (401) is the bridge's configuration, not the item's: transient. An error
that is none of these (a conversion of the bridge's own that raises on some content) is retried
too, but set aside after ``INTERNAL_ATTEMPTS`` in a row (about a minute): retried forever, it
would stall the portal. The backfill of a new portal's history (backfill.py) does the same
with each history message. The notice carries the log index it stands for
(``org.kalandra.set_aside``, in clear in an encrypted portal too), so that a notice sent before
a crash and not yet recorded is found in the room again instead of being sent twice.

A Kalandra text whose Matrix content would pass ``PART_LIMIT`` is sent as several messages, in
order, plain text (the formatted body would double the size), whose bodies joined are the
whole text. Each part has its own transaction id and carries its log index and part number,
so that parts already sent are found again in the room after a crash (to_matrix.py).
"""

from __future__ import annotations

import json
import time
from typing import Final

import aiohttp
from mautrix.errors import (
    IntentError,
    MatrixConnectionError,
    MatrixRequestError,
    MatrixResponseError,
)

from kalandra_core.client.driver import ClientError
from kalandra_core.storage.reachable import outage

# Bytes of a part's content as JSON (non-ASCII escaped, as Megolm's plaintext is): a Matrix
# event is at most 64 KiB whole, and encryption adds a third (base64) plus the envelope.
PART_LIMIT: Final = 30_000
LOG_INDEX_KEY: Final = "org.kalandra.log_index"  # in each bridged message's content
PART_KEY: Final = "org.kalandra.part"  # in each part's content: its number, from 0
PARTS_KEY: Final = "org.kalandra.parts"  # how many
SET_ASIDE_KEY: Final = "org.kalandra.set_aside"  # in a set-aside notice: what and why
UNREADABLE: Final = "unreadable"  # the reason of a kept history message that cannot be opened
PERMANENT_ATTEMPTS: Final = 2  # consecutive permanent failures before an item is set aside
# Consecutive errors of the bridge's own before an item is set aside: about a minute of the
# queue's backoff, long enough for a passing fault that is none of the known transient ones.
INTERNAL_ATTEMPTS: Final = 8
# What waiting may cure: the network, Matrix's connection, the Kalandra server's answer.
# (A crypto error is not: it is explained only by its cause.)
_EXPLAINED: Final = (
    MatrixConnectionError,
    MatrixRequestError,
    MatrixResponseError,
    OSError,
    TimeoutError,
    aiohttp.ClientError,
    ClientError,
)
_DATABASE_MODULES: Final = frozenset({"sqlite3", "asyncpg", "sqlalchemy", "aiosqlite"})
_TRANSIENT_STATUS: Final = frozenset({401, 408, 429})


def permanent_reason(exc: BaseException) -> str | None:
    """The errcode (or HTTP status) of a failure that repeating will not cure; None: transient."""
    if isinstance(exc, IntentError) and exc.__cause__ is not None:
        exc = exc.__cause__  # a ghost's join refused: the homeserver's answer is the cause
    if not isinstance(exc, MatrixRequestError):
        return None
    status = exc.http_status
    if not 400 <= status < 500 or status in _TRANSIENT_STATUS:
        return None
    errcode = exc.errcode
    if errcode == "M_LIMIT_EXCEEDED":
        return None
    return errcode if isinstance(errcode, str) and errcode else f"HTTP {status}"


def unexplained(exc: BaseException) -> bool:
    """Whether ``exc`` is none of what waiting cures: not Matrix's answer or connection, not
    the network, not a database (ours or the Kalandra server's), not a timeout. An error of
    the bridge's own (a conversion that raises on some content): repeating it gives the same
    error, and retrying it forever would stall the portal."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _EXPLAINED) or outage(current):
            return False
        if type(current).__module__.split(".")[0] in _DATABASE_MODULES:
            return False
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return True


class Attempts:
    """One item's failed attempts: whether its latest failure sets it aside (the queue toward
    Matrix and the backfill count them alike)."""

    def __init__(self) -> None:
        self.refused = 0  # permanent failures in a row
        self.unexplained = 0  # errors of the bridge's own in a row

    def set_aside(self, exc: BaseException) -> str | None:
        """The reason to set the item aside now; None: retry it (after a pause)."""
        reason = permanent_reason(exc)
        self.refused = self.refused + 1 if reason is not None else 0
        if reason is not None:
            return reason if self.refused >= PERMANENT_ATTEMPTS else None
        self.unexplained = self.unexplained + 1 if unexplained(exc) else 0
        if self.unexplained >= INTERNAL_ATTEMPTS:
            return f"internal error ({type(exc).__name__})"
        return None


def notice_for(content: dict[str, object]) -> int | None:
    """The log index a set-aside notice (its content, or the clear part of an encrypted one)
    stands for; None: not such a notice."""
    marker = content.get(SET_ASIDE_KEY)
    index = marker.get("log_index") if isinstance(marker, dict) else None
    return index if isinstance(index, int) else None


def content_size(content: object) -> int:
    return len(json.dumps(content))


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` bytes as JSON strings (escapes counted), cut at
    the last whitespace of a piece's second half when there is one; joined they are ``text``."""
    pieces: list[str] = []
    start, size, space = 0, 0, -1
    for i, char in enumerate(text):
        cost = len(json.dumps(char)) - 2
        if size + cost > limit and i > start:
            cut = space + 1 if space >= start + (i - start) // 2 else i
            pieces.append(text[start:cut])
            start = cut
            size = content_size(text[start:i]) - 2
            space = -1
        size += cost
        if char.isspace():
            space = i
    pieces.append(text[start:])
    return pieces


def notice_text(ghost: str, log_index: int, timestamp_ms: int, reason: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp_ms / 1000))
    why = f"the homeserver refused it ({reason})"
    if reason == UNREADABLE:
        why = "the bridge's kept copy of it could not be read"
    return (
        f"A Kalandra message from {ghost} (log index {log_index}, {when}) could not be bridged"
        f" to Matrix: {why}."
    )
