"""What only MemoryStore has: seeded ids and states returned as copies. The Store contract
itself runs against MemoryStore in test_store.py, next to the SQL engines."""

from __future__ import annotations

import random

import pytest
from integration.store_helpers import HIGH, OWNER, new_room, state_of

from kalandra_core.storage import Role, RoomMember
from kalandra_core.storage.memory import MemoryStore


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


async def test_seeded_ids_repeat() -> None:
    a, b = MemoryStore(rng=random.Random(7)), MemoryStore(rng=random.Random(7))
    ids = [(await a.create_member(f"m{i}")).member_id for i in range(5)]
    assert ids == [(await b.create_member(f"m{i}")).member_id for i in range(5)]
    assert await a.issue_token(ids[0]) == await b.issue_token(ids[0])


async def test_returned_state_is_a_copy(store: MemoryStore) -> None:
    rid = await new_room(store)
    state = await state_of(store, rid)
    state.members[7] = RoomMember(7, Role.MEMBER, 1)
    assert (await state_of(store, rid)).members == {HIGH: OWNER}
