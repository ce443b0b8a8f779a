"""When to self-update our leaf: post-compromise security on a message/time budget.

A member that sends N messages or lives T seconds in the group since its leaf last changed asks
for a self-update commit (standard: 100 messages / 24 h, high: 10 / 1 h). Any
commit of ours with an UpdatePath refreshes the leaf, so it resets the budget too. Sans-IO: the
caller passes the clock in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    messages: int
    seconds: float

    STANDARD: ClassVar[UpdatePolicy]
    HIGH: ClassVar[UpdatePolicy]

    def __post_init__(self) -> None:
        if self.messages < 1 or self.seconds <= 0:
            raise ValueError("update policy needs at least 1 message and a positive interval")

    @classmethod
    def named(cls, name: str) -> UpdatePolicy:
        try:
            return {"standard": cls.STANDARD, "high": cls.HIGH}[name]
        except KeyError:
            raise ValueError(f"unknown update profile {name!r} (standard, high)") from None


UpdatePolicy.STANDARD = UpdatePolicy(messages=100, seconds=24 * 3600)
UpdatePolicy.HIGH = UpdatePolicy(messages=10, seconds=3600)


class UpdateTracker:
    __slots__ = ("_messages", "_policy", "_since")

    def __init__(self, policy: UpdatePolicy, now: float) -> None:
        self._policy = policy
        self._messages = 0
        self._since = now

    @property
    def policy(self) -> UpdatePolicy:
        return self._policy

    def message_sent(self) -> None:
        self._messages += 1

    def leaf_updated(self, now: float) -> None:
        """Our leaf changed (self-update, or any commit of ours that carried a path)."""
        self._messages = 0
        self._since = now

    def due(self, now: float) -> bool:
        return self._messages >= self._policy.messages or now - self._since >= self._policy.seconds

    def to_state(self) -> list[float]:
        return [self._messages, self._since]

    @classmethod
    def from_state(cls, policy: UpdatePolicy, state: list[float]) -> UpdateTracker:
        tracker = cls(policy, float(state[1]))
        tracker._messages = int(state[0])
        return tracker
