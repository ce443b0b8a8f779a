"""The per-sender symmetric ratchet, with a bounded skipped-key store.

See docs/wire-protocol.md, Ratchet.

    message_key = HMAC-SHA256(chain_key, "message")
    next_chain  = HMAC-SHA256(chain_key, "chain")

Generation 0's key comes from the seed itself. Jumping ahead keeps the keys of the generations
skipped over (at most ``MAX_SKIP``) so late messages still decrypt; every key is deleted once used
and the chain only moves forward, which is what gives forward secrecy. Lookups are two-phase
(:meth:`lookup` then :meth:`commit`) so a message that fails authentication consumes nothing.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from .errors import GenerationOverflow, InvalidKeyLength, RatchetTooFarBehind, ReplayedMessage

MAX_SKIP: Final = 1000
MAX_SKIPPED_KEYS: Final = 1000
MAX_GENERATION: Final = 0xFFFFFFFF
KEY_SIZE: Final = 32


def _step(chain_key: bytes) -> tuple[bytes, bytes]:
    return (
        hmac.digest(chain_key, b"message", "sha256"),
        hmac.digest(chain_key, b"chain", "sha256"),
    )


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """A derived key and the ratchet state that using it would leave behind."""

    generation: int
    key: bytes
    chain_key: bytes | None  # None: the key came from the skipped store
    next_generation: int
    skipped: tuple[tuple[int, bytes], ...]


class SymmetricRatchet:
    __slots__ = ("_chain_key", "_floor", "_generation", "_skipped")

    def __init__(self, seed: bytes, generation: int = 0) -> None:
        if len(seed) != KEY_SIZE:
            raise InvalidKeyLength(f"ratchet seed must be {KEY_SIZE} bytes, got {len(seed)}")
        self._chain_key = bytes(seed)
        self._generation = generation
        self._skipped: dict[int, bytes] = {}
        # Generations below the floor were used or evicted from the skipped store.
        self._floor = generation

    @property
    def generation(self) -> int:
        """The next generation the chain will produce."""
        return self._generation

    def next_key(self) -> tuple[int, bytes]:
        """Key for the next generation (sending)."""
        found = self.lookup(self._generation)
        self.commit(found)
        return found.generation, found.key

    def message_key(self, generation: int) -> bytes:
        """Key for ``generation`` (receiving), consumed: asking twice raises ReplayedMessage."""
        found = self.lookup(generation)
        self.commit(found)
        return found.key

    def lookup(self, generation: int) -> KeyLookup:
        """Derive the key for ``generation`` without changing the ratchet."""
        current = self._generation
        if generation < current:
            key = self._skipped.get(generation)
            if key is not None:
                return KeyLookup(generation, key, None, current, ())
            if generation >= self._floor:
                raise ReplayedMessage(generation)
            raise RatchetTooFarBehind(current, generation, "key expired or already used")
        if generation >= MAX_GENERATION:
            # The reference cannot produce a key for u32::MAX either.
            raise GenerationOverflow(f"generation {generation} is past the end of the chain")
        if generation - current > MAX_SKIP:
            raise RatchetTooFarBehind(current, generation, f"more than {MAX_SKIP} ahead")
        chain = self._chain_key
        skipped: list[tuple[int, bytes]] = []
        for g in range(current, generation):
            mk, chain = _step(chain)
            skipped.append((g, mk))
        key, chain = _step(chain)
        return KeyLookup(generation, key, chain, generation + 1, tuple(skipped))

    def commit(self, found: KeyLookup) -> None:
        """Apply a lookup: delete the used key, keep skipped ones (bounded), advance."""
        if found.chain_key is None:
            del self._skipped[found.generation]
            return
        self._chain_key = found.chain_key
        self._generation = found.next_generation
        self._skipped.update(found.skipped)
        while len(self._skipped) > MAX_SKIPPED_KEYS:
            oldest = min(self._skipped)
            del self._skipped[oldest]
            self._floor = max(self._floor, oldest + 1)

    # --- persistence (secret material: seal it before it leaves memory) ----------------------

    def to_state(self) -> dict[str, object]:
        return {
            "chain_key": self._chain_key,
            "generation": self._generation,
            "floor": self._floor,
            "skipped": [[g, k] for g, k in sorted(self._skipped.items())],
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> SymmetricRatchet:
        chain_key = state["chain_key"]
        generation = state["generation"]
        floor = state["floor"]
        skipped = state["skipped"]
        if not (
            isinstance(chain_key, bytes)
            and isinstance(generation, int)
            and isinstance(floor, int)
            and isinstance(skipped, list)
        ):
            raise ValueError("malformed ratchet state")
        ratchet = cls(chain_key, generation)
        ratchet._floor = floor
        ratchet._skipped = {int(g): bytes(k) for g, k in skipped}
        return ratchet
