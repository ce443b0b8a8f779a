"""HLC packing (the reference vector) and clock rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_vectors import load_wire_vectors

from kalandra_core.proto.hlc import LOGICAL_MASK, HybridClock, pack, skew_ms, unpack

HLC_VECTOR = next(v for v in load_wire_vectors() if v["kind"] == "hlc")


def test_reference_vector() -> None:
    inputs = HLC_VECTOR["decoded"]["inputs"]
    value = pack(inputs["physical_ms"], inputs["logical"])
    assert value == HLC_VECTOR["decoded"]["output"]["hlc_u64"]
    assert value.to_bytes(8, "big").hex() == HLC_VECTOR["hex"]
    assert unpack(value) == (inputs["physical_ms"], inputs["logical"])


def test_range_checks() -> None:
    with pytest.raises(ValueError, match="42 bits"):
        pack(1 << 42, 0)
    with pytest.raises(ValueError, match="22 bits"):
        pack(0, LOGICAL_MASK + 1)


def test_tick_and_observe() -> None:
    clock = HybridClock()
    a = clock.tick(1000)
    assert unpack(a) == (1000, 0)
    assert unpack(clock.tick(1000)) == (1000, 1)
    # A remote stamp from the future pulls us forward.
    assert unpack(clock.observe(pack(5000, 7), 1001)) == (5000, 8)
    assert unpack(clock.observe(pack(5000, 3), 1002)) == (5000, 9)
    # Wall clock overtakes everything: logical resets.
    assert unpack(clock.observe(pack(5000, 3), 6000)) == (6000, 0)
    assert skew_ms(pack(7000, 0), 6000) == 1000


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 10_000), st.integers(0, 2**52)), max_size=50)
)
def test_stamps_strictly_increase(events: list[tuple[bool, int, int]]) -> None:
    clock = HybridClock()
    last = -1
    for is_receive, now, remote in events:
        stamp = clock.observe(remote, now) if is_receive else clock.tick(now)
        assert stamp > last
        if is_receive:
            assert stamp > remote
        last = stamp
