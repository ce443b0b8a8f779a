"""SenderKeyStore: one room's sender keys for the current epoch (and the one before it).

It follows epochs (``rekey`` after every processed commit), encrypts as any leaf we hold (our
own, or a bridged user's puppet leaf) and decrypts anyone's message. Send and receive chains are
separate, so our own messages echoed back by the server decrypt too (the reference shares one
chain and cannot). A generation is accepted once per (epoch, sender): replays are rejected.
The previous epoch's receive chains are kept so messages sequenced just before a commit still
decrypt after we have moved on; older epochs are forgotten (forward secrecy).

State holds secrets: persist it only through :func:`sealed.seal`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cbor2

from ..proto.payloads import EncryptedMessage, PushKey
from . import envelope
from .errors import EpochMismatch, UnknownSender
from .ratchet import MAX_SKIP, SymmetricRatchet
from .sender_keys import derive_sender_seed

_STATE_VERSION = 1


class _EpochKeys:
    __slots__ = ("epoch", "members", "receive", "secret", "send")

    def __init__(self, epoch: int, secret: bytes, members: frozenset[int]) -> None:
        self.epoch = epoch
        self.secret = bytes(secret)
        self.members = members
        self.receive: dict[int, SymmetricRatchet] = {}
        self.send: dict[int, SymmetricRatchet] = {}

    def send_chain(self, sender_index: int) -> SymmetricRatchet:
        """The chain we encrypt with as ``sender_index`` (started on first use)."""
        return self._chain(self.send, sender_index)

    def receive_chain(self, sender_index: int) -> SymmetricRatchet:
        """The chain ``sender_index``'s messages are decrypted with (started on first use),
        our own echoed back included."""
        return self._chain(self.receive, sender_index)

    def _chain(self, chains: dict[int, SymmetricRatchet], sender_index: int) -> SymmetricRatchet:
        chain = chains.get(sender_index)
        if chain is None:
            if sender_index not in self.members:
                raise UnknownSender(f"no member at leaf {sender_index} in epoch {self.epoch}")
            chain = SymmetricRatchet(derive_sender_seed(self.secret, self.epoch, sender_index))
            chains[sender_index] = chain
        return chain

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "secret": self.secret,
            "members": sorted(self.members),
            "receive": {i: r.to_state() for i, r in self.receive.items()},
            "send": {i: r.to_state() for i, r in self.send.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _EpochKeys:
        keys = cls(state["epoch"], state["secret"], frozenset(state["members"]))
        keys.receive = {
            int(i): SymmetricRatchet.from_state(s) for i, s in state["receive"].items()
        }
        keys.send = {int(i): SymmetricRatchet.from_state(s) for i, s in state["send"].items()}
        return keys


class SenderKeyStore:
    def __init__(
        self, *, epoch: int, epoch_secret: bytes, own_index: int, member_indices: set[int]
    ) -> None:
        """``epoch_secret`` is MLS-Exporter("kalandra sender keys v1", "", 32) of ``epoch``."""
        self.own_index = own_index
        self._current = _EpochKeys(epoch, epoch_secret, frozenset(member_indices))
        self._previous: _EpochKeys | None = None

    @property
    def epoch(self) -> int:
        return self._current.epoch

    @property
    def members(self) -> frozenset[int]:
        return self._current.members

    def rekey(
        self,
        *,
        epoch: int,
        epoch_secret: bytes,
        member_indices: set[int],
        own_index: int | None = None,
    ) -> None:
        """Move to a new epoch (after a commit); the old epoch stays readable for one epoch."""
        if epoch <= self._current.epoch:
            raise ValueError(f"epoch must increase: {epoch} after {self._current.epoch}")
        self._previous = self._current
        self._previous.send.clear()  # never send in an old epoch
        self._current = _EpochKeys(epoch, epoch_secret, frozenset(member_indices))
        if own_index is not None:
            self.own_index = own_index

    def encrypt(
        self,
        plaintext: bytes,
        *,
        sender_index: int | None = None,
        random8: bytes | None = None,
        push_keys: list[PushKey] | None = None,
    ) -> EncryptedMessage:
        """Encrypt as ``sender_index`` (default: our own leaf) at the next generation."""
        keys = self._current
        index = self.own_index if sender_index is None else sender_index
        generation, key = keys.send_chain(index).next_key()
        return envelope.encrypt(
            key,
            plaintext,
            epoch=keys.epoch,
            sender_index=index,
            generation=generation,
            random8=random8,
            push_keys=push_keys,
        )

    def send_generation(self, sender_index: int) -> int:
        """The generation the next message sent as ``sender_index`` will use."""
        keys = self._current
        return keys.send_chain(sender_index).generation

    def skip_send_to(self, sender_index: int, generation: int) -> None:
        """Never send as ``sender_index`` below ``generation`` in the current epoch: a state
        restored from an older snapshot must not reuse a message key already used."""
        keys = self._current
        chain = keys.send_chain(sender_index)
        while chain.generation < generation:
            # The keys skipped over are never used for sending: not kept.
            target = min(generation, chain.generation + MAX_SKIP) - 1
            chain.commit(replace(chain.lookup(target), skipped=()))

    def message_key(self, message: EncryptedMessage) -> bytes:
        """The key of a message we sent or may receive, without consuming it (for push keys)."""
        keys = self._keys_for(message.epoch)
        return keys.receive_chain(message.sender_index).lookup(message.generation).key

    def decrypt(self, message: EncryptedMessage) -> bytes:
        """Decrypt anyone's message; the key is consumed only if authentication succeeds."""
        keys = self._keys_for(message.epoch)
        chain = keys.receive_chain(message.sender_index)
        found = chain.lookup(message.generation)
        plaintext = envelope.decrypt(found.key, message)
        chain.commit(found)
        index = message.sender_index
        if keys is self._current and (index == self.own_index or index in keys.send):
            # A generation seen in the log was used: we never send with it again, even from a
            # state restored from a snapshot older than that message (a crash).
            self.skip_send_to(index, message.generation + 1)
        return plaintext

    def _keys_for(self, epoch: int) -> _EpochKeys:
        if epoch == self._current.epoch:
            return self._current
        if self._previous is not None and epoch == self._previous.epoch:
            return self._previous
        raise EpochMismatch(self._current.epoch, epoch)

    # --- persistence ----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return cbor2.dumps(
            {
                "v": _STATE_VERSION,
                "own_index": self.own_index,
                "current": self._current.to_state(),
                "previous": None if self._previous is None else self._previous.to_state(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SenderKeyStore:
        state = cbor2.loads(data)
        if not isinstance(state, dict) or state.get("v") != _STATE_VERSION:
            raise ValueError("not a sender-key store state (or an unknown version)")
        store = cls.__new__(cls)
        store.own_index = state["own_index"]
        store._current = _EpochKeys.from_state(state["current"])
        previous = state["previous"]
        store._previous = None if previous is None else _EpochKeys.from_state(previous)
        return store
