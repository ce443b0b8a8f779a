"""Appservice transactions that arrive after a gap in Synapse's numbering.

Synapse numbers an appservice's transactions 1, 2, 3, ... and sends them one at a time, oldest
first. A race in its scheduler breaks that: while the bridge is marked down, a transaction made
just as the recovery finishes is stored but never sent, and later ones go out as usual; the
stored one is sent only at the next recovery, after events that came after it (seen here after a
kill -9 of the bridge: one Matrix message held back indefinitely). So a transaction whose number
skips one is refused once (500): Synapse marks the bridge down, and its recovery sends the oldest
unsent transaction first, then this one again, which is then taken even if the gap is still
there (a number Synapse skipped for good, e.g. a rolled-back PostgreSQL sequence value).
Numbers going backwards (Synapse restarted with an empty transaction table) are taken.
"""

from __future__ import annotations


class TxnOrder:
    def __init__(self, last: int | None = None) -> None:
        self.last = last  # the number of the last transaction acknowledged
        self._refused: set[int] = set()

    @staticmethod
    def number(txn_id: str) -> int | None:
        return int(txn_id) if txn_id.isdigit() else None

    def admit(self, txn_id: str) -> bool:
        """Whether to process ``txn_id`` now; False: refuse it once, an earlier one is missing."""
        number = self.number(txn_id)
        if number is None or self.last is None or number <= self.last + 1:
            return True
        if number in self._refused:
            return True  # it came back as the oldest Synapse has: nothing earlier is pending
        self._refused.add(number)
        return False

    def acknowledged(self, txn_id: str) -> None:
        number = self.number(txn_id)
        if number is not None:
            self.last = number
            self._refused = {n for n in self._refused if n > number}
