"""Sender-key errors."""

from __future__ import annotations


class SenderKeyError(Exception):
    """A message could not be encrypted or decrypted with the epoch's sender keys."""


class UnknownSender(SenderKeyError):
    """The envelope names a leaf with no sender key in this epoch."""


class EpochMismatch(SenderKeyError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"message is for epoch {actual}, keys are for epoch {expected}")
        self.expected = expected
        self.actual = actual


class RatchetTooFarBehind(SenderKeyError):
    """The generation is older than any key still held, or more than MAX_SKIP ahead."""

    def __init__(self, current: int, requested: int, reason: str) -> None:
        super().__init__(f"no key for generation {requested} (ratchet at {current}): {reason}")
        self.current = current
        self.requested = requested


class ReplayedMessage(SenderKeyError):
    """This sender's key for this epoch and generation was already used."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"generation {generation} was already used (replay)")
        self.generation = generation


class DecryptionFailed(SenderKeyError):
    pass


class InvalidKeyLength(SenderKeyError):
    pass


class GenerationOverflow(SenderKeyError):
    pass
