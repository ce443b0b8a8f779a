"""mautrix warnings that need no operator action, logged at DEBUG instead.

mautrix's crypto warns "Didn't find cross-signing key ... of @user" each time it looks at the
trust of a device whose user has no cross-signing keys, which is common (many clients, and
users who never set it up) and changes nothing the operator can act on: the device is then
simply unverified, which ``bridge.encryption.verification_levels`` decides about. Other
warnings of the same loggers stay warnings.
"""

from __future__ import annotations

import logging

# (logger, start of the message) of the records demoted to DEBUG.
DEMOTED = (("mau.crypto", "Didn't find cross-signing key"),)


class Demote(logging.Filter):
    """Records of one logger whose message starts with one of ``prefixes`` become DEBUG (and
    are dropped unless the logger is enabled for DEBUG)."""

    def __init__(self, logger: logging.Logger, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.logger = logger
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(self.prefixes):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return self.logger.isEnabledFor(logging.DEBUG)


def install() -> None:
    """Filters on the loggers that emit the records themselves (a logger's filters see only
    its own records, so these go on each, not on a parent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in DEMOTED:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, Demote) for f in logger.filters):
            logger.addFilter(Demote(logger, prefixes))
