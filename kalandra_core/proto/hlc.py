"""Hybrid logical clock timestamps for the header's ``hlc_timestamp`` (u64).

Layout: physical Unix milliseconds in the top 42 bits, a logical counter in the low 22 bits.
Sans-IO: callers pass the wall-clock milliseconds in, so simulations can use a virtual clock.
"""

from __future__ import annotations

from typing import Final

LOGICAL_BITS: Final = 22
LOGICAL_MASK: Final = (1 << LOGICAL_BITS) - 1
PHYSICAL_LIMIT: Final = 1 << 42


def pack(physical_ms: int, logical: int) -> int:
    if not 0 <= physical_ms < PHYSICAL_LIMIT:
        raise ValueError("physical time must fit in 42 bits of milliseconds")
    if not 0 <= logical <= LOGICAL_MASK:
        raise ValueError("logical counter must fit in 22 bits")
    return (physical_ms << LOGICAL_BITS) | logical


def unpack(hlc: int) -> tuple[int, int]:
    return hlc >> LOGICAL_BITS, hlc & LOGICAL_MASK


def skew_ms(hlc: int, now_ms: int) -> int:
    """How far ``hlc`` is ahead of ``now_ms`` (negative: in the past)."""
    return (hlc >> LOGICAL_BITS) - now_ms


class HybridClock:
    """One node's HLC. ``tick`` stamps a local event; ``observe`` merges a received stamp."""

    __slots__ = ("_logical", "_physical")

    def __init__(self) -> None:
        self._physical = 0
        self._logical = 0

    @property
    def last(self) -> int:
        return pack(self._physical, self._logical)

    def tick(self, now_ms: int) -> int:
        if now_ms > self._physical:
            self._physical, self._logical = now_ms, 0
        else:
            self._bump(self._logical + 1)
        return self.last

    def observe(self, remote: int, now_ms: int) -> int:
        r_phys, r_log = unpack(remote)
        m = max(now_ms, self._physical, r_phys)
        if m == now_ms and now_ms > self._physical and now_ms > r_phys:
            logical = 0
        elif m == self._physical == r_phys:
            logical = max(self._logical, r_log) + 1
        elif m == self._physical:
            logical = self._logical + 1
        else:
            logical = r_log + 1
        self._physical = m
        self._bump(logical)
        return self.last

    def _bump(self, logical: int) -> None:
        if logical > LOGICAL_MASK:
            # Counter exhausted within one millisecond: borrow the next millisecond.
            self._physical += 1
            logical = 0
        self._logical = logical
