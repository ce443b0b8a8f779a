"""Errors of our MLS layer: callers never see rfc9420's exception types."""

from __future__ import annotations


class MlsError(Exception):
    pass


class InvalidMlsMessage(MlsError):
    """Undecodable, unauthenticated or otherwise invalid input; the group state is unchanged."""


class WrongEpoch(MlsError):
    """A handshake message for an epoch other than ours (sync the log first)."""

    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__(f"message is for epoch {theirs}, group is at epoch {ours}")
        self.ours = ours
        self.theirs = theirs


class GroupInactive(MlsError):
    """We were removed from this group; it can only be forgotten."""


class PendingCommitExists(MlsError):
    """A commit of ours is waiting for the sequencer: merge or discard it first."""


class NoSuchMember(MlsError):
    pass
