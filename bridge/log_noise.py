"""mautrix warnings that need no operator action, logged at DEBUG instead.

mautrix's crypto warns "Didn't find cross-signing key ... of @user" and "Device ... isn't
cross-signed" each time it looks at the trust of a device whose user has no cross-signing keys,
which is common (many clients, users who never set it up) and changes nothing an operator can
act on: the device is then simply unverified, and ``bridge.encryption.verification_levels``
decides about that. "No one-time keys nor device keys ... to share" means there was nothing to
upload. Other warnings of the same loggers stay warnings.

"Failed to create missing outbound sessions" comes with a traceback at ERROR when a device the
room's key was being shared with is gone (its user logged it out meanwhile: the homeserver has
no key of it to claim). The key goes to the other devices; the gone one needs none. It stays a
warning, in one line with the reason, without the traceback.
"""

from __future__ import annotations

import logging
import re

# The records demoted to DEBUG: (logger, pattern their message matches from its start).
_PATTERNS = (
    re.compile(r"Didn't find cross-signing key "),
    re.compile(r"Device \S+ isn't cross-signed$"),
    re.compile(r"No one-time keys nor device keys got when trying to share keys"),
)
# The bot's device logs as mau.crypto, the ghosts' devices (encryption/ghost_devices.py) as
# mau.crypto.ghost.
DEMOTED = tuple((name, p) for name in ("mau.crypto", "mau.crypto.ghost") for p in _PATTERNS)
_SHORTENED = re.compile(r"Failed to create missing outbound sessions$")


class Demote(logging.Filter):
    """Records of one logger whose message matches one of ``patterns`` become DEBUG (and are
    dropped unless the logger is enabled for DEBUG)."""

    def __init__(self, logger: logging.Logger, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.logger = logger
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if _SHORTENED.match(record.msg) and record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.msg} ({type(exc).__name__}: {exc})"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            return True
        if not any(p.match(record.msg) for p in self.patterns):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return self.logger.isEnabledFor(logging.DEBUG)


def install() -> None:
    """A filter on each logger that emits such records (a logger's filters see only its own
    records, not its children's: a filter on a parent would not do)."""
    by_logger: dict[str, tuple[re.Pattern[str], ...]] = {}
    for name, pattern in DEMOTED:
        by_logger[name] = (*by_logger.get(name, ()), pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, Demote) for f in logger.filters):
            logger.addFilter(Demote(logger, patterns))
