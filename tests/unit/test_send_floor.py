"""A sender-key store restored from an older snapshot is moved past the generations already
used, so no message key is used twice; receivers still decrypt what it sends next."""

from __future__ import annotations

import os

from kalandra_core.crypto import MAX_SKIP, SenderKeyStore

SECRET = os.urandom(32)


def _store(own: int) -> SenderKeyStore:
    return SenderKeyStore(epoch=3, epoch_secret=SECRET, own_index=own, member_indices={0, 1, 2})


def test_a_restored_send_chain_skips_the_generations_already_used() -> None:
    bridge, reader = _store(0), _store(1)
    snapshot = bridge.to_bytes()
    used = [bridge.encrypt(f"m{n}".encode(), sender_index=2) for n in range(5)]
    assert [m.generation for m in used] == list(range(5))
    assert bridge.send_generation(2) == 5

    restored = SenderKeyStore.from_bytes(snapshot)  # the crash lost the five sends
    assert restored.send_generation(2) == 0
    restored.skip_send_to(2, 5)
    assert restored.send_generation(2) == 5
    fresh = restored.encrypt(b"after the restart", sender_index=2)
    assert fresh.generation == 5
    for message in used:
        reader.decrypt(message)
    assert reader.decrypt(fresh) == b"after the restart"


def test_skipping_is_idempotent_and_never_goes_back() -> None:
    store = _store(0)
    for _ in range(3):
        store.encrypt(b"x")
    store.skip_send_to(0, 2)
    assert store.send_generation(0) == 3
    store.skip_send_to(0, 3)
    assert store.send_generation(0) == 3


def test_skipping_further_than_the_skip_window() -> None:
    store = _store(0)
    store.skip_send_to(0, 2 * MAX_SKIP + 7)
    assert store.encrypt(b"far ahead").generation == 2 * MAX_SKIP + 7
    assert len(store.to_bytes()) < 4096  # the keys skipped over are not kept (32 bytes each)
